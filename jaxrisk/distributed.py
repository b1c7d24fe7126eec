"""Many hosts on JAX's distributed runtime: one idempotent initialise, and who writes.

On a TPU pod slice, SLURM or Kubernetes `jax.distributed.initialize()` finds its peers by itself; elsewhere
each process is told the coordinator's address, the process count and its own index (`--coordinator
HOST:PORT --num-processes N --process-id I` on every search command). After it, `jax.devices()` lists every
host's devices, one mesh spans them all, and only process 0 writes files (`jaxrisk.io.is_writer`).
"""

from __future__ import annotations

import os

import jax

from jaxrisk.errors import InputError

_AUTO_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "JOBSET_NAME", "MEGASCALE_COORDINATOR_ADDRESS")
_started: tuple | None = None
_barriers = 0   # barriers passed: every process passes the same ones in the same order


# how long a process waits for the others: at a barrier before a search, and at exit (JAX's own default of 300 s
# aborted a process whose peer was still writing its report: one process must not crash the other for being late)
WAIT_S = 1800


def cluster_detected() -> bool:
    """True where JAX can find its peers without flags (a TPU pod slice, SLURM, a Kubernetes JobSet)."""
    return any(os.environ.get(name) for name in _AUTO_ENV)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the job's processes (once; later calls with the same arguments do nothing). With no arguments and no
    cluster environment this is a single-process run and nothing is started. Returns whether several processes
    run. Must come before anything touches a device."""
    global _started
    given = (coordinator, num_processes, process_id)
    if _started is not None:
        if given != _started and any(v is not None for v in given):
            raise InputError(f"the distributed runtime was already started with coordinator={_started[0]}, "
                             f"num_processes={_started[1]}, process_id={_started[2]}; it cannot be restarted")
        return jax.process_count() > 1
    if any(v is not None for v in given):
        missing = [flag for flag, v in zip(("--coordinator", "--num-processes", "--process-id"), given) if v is None]
        if missing:
            raise InputError(f"a multi-process run needs --coordinator, --num-processes and --process-id together; "
                             f"missing {', '.join(missing)}")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--coordinator {coordinator!r}: expected HOST:PORT (e.g. 10.0.0.1:1234)")
        if not 0 <= process_id < num_processes:
            raise InputError(f"--process-id {process_id}: expected 0 to {num_processes - 1} (--num-processes "
                             f"{num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices talk through gloo
        jax.distributed.initialize(coordinator, num_processes, process_id, shutdown_timeout_seconds=WAIT_S)
    elif cluster_detected():
        jax.distributed.initialize(shutdown_timeout_seconds=WAIT_S)
    _started = given
    return jax.process_count() > 1


def wait_for_every_process(name: str, timeout_s: float = WAIT_S) -> None:
    """Hold until every process of the job gets here (nothing in a single-process run), through the coordination
    service, which waits up to `timeout_s`: one host still compiling or loading a model must not make another
    host's next collective give up (on CPU, gloo waits only 30 s for a late peer, at its set-up and at each
    collective). Keep the work between this barrier and the collective it guards short and the same on every host."""
    global _barriers
    if jax.process_count() == 1:
        return
    from jax._src import distributed as runtime   # the client's barrier is the one that takes a timeout

    _barriers += 1
    runtime.global_state.client.wait_at_barrier(f"jaxrisk-{name}-{_barriers}", int(timeout_s * 1000))
