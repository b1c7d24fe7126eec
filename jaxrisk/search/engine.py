"""The restart-parallel search engine every jaxrisk search runs on.

A search problem is pure and describes ONE restart ("lane"):

    problem.init(key, lane) -> state          # `lane`: that restart's slice of the lane inputs
    problem.step(state, key) -> (state, metrics)   # metrics: dict of scalars
    problem.done(state) -> bool scalar

The problem itself is a pytree (e.g. a `flax.struct.dataclass`): its arrays
(weights, data) are arguments of the compiled program, replicated over the
mesh; its static fields are hyperparameters. The engine vmaps the problem
over R lanes, runs `chunk_steps` steps per call with `lax.scan`, freezes
finished or failed lanes by masking (shapes never change), shards the lane
axis over a device mesh, checkpoints between chunks with orbax, and stops
when every lane is done.

Each step's key is `fold_in(lane_key, global_step)`, so results depend
neither on the chunk size nor on how lanes are spread over devices, and a
resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxrisk.data.text import json_object
from jaxrisk.errors import InputError
from jaxrisk.io import write_json
from jaxrisk.preemption import searching, stop_if_requested
from jaxrisk.search.fingerprint import fingerprint
from jaxrisk.search.config import RunConfig
from jaxrisk.search.mesh import lane_sharding, replicated, restart_mesh

PyTree = Any


class SearchProblem(Protocol):
    def init(self, key: jax.Array, lane: PyTree) -> PyTree: ...

    def step(self, state: PyTree, key: jax.Array) -> tuple[PyTree, dict[str, jax.Array]]: ...

    def done(self, state: PyTree) -> jax.Array: ...


@dataclasses.dataclass
class SearchResult:
    state: PyTree  # final per-lane states, numpy, leading axis R
    metrics: dict[str, np.ndarray]  # name -> [steps, R]; NaN where a lane did not advance
    steps: np.ndarray  # [R] steps each lane ran
    failed_at: np.ndarray  # [R] global step at which the lane produced a NaN, -1 if never
    done: np.ndarray  # [R]
    resumed_from_step: int  # 0 unless resumed from a checkpoint


def _tree_where(pred_r: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Per-lane select; `pred_r` is [R], leaves are [R, ...]."""
    def sel(a, b):
        return jnp.where(pred_r.reshape(pred_r.shape + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(sel, new, old)


def _nan_free_per_lane(tree: PyTree, n_lanes: int) -> jax.Array:
    """[R] True where no float leaf holds a NaN (inf is allowed: problems use it as a sentinel)."""
    ok = jnp.ones((n_lanes,), bool)
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            ok &= ~jnp.any(jnp.isnan(leaf.reshape(n_lanes, -1)), axis=1)
    return ok


def _pad_lanes(tree: PyTree, n_pad: int) -> PyTree:
    if n_pad == 0:
        return tree
    return jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], n_pad, axis=0)]), tree)


def _check_problem(problem, init_state: PyTree, step_state: PyTree, metrics: dict) -> None:
    """A problem's `step` keeps its state's structure, shapes and dtypes (else the compiled scan cannot carry
    it) and returns one scalar per metric and lane: said here, by name, not deep inside `lax.scan`."""
    try:
        chex.assert_trees_all_equal_shapes_and_dtypes(init_state, step_state)
        chex.assert_rank(list(metrics.values()), 1)   # vmapped scalars: [R]
    except (AssertionError, ValueError) as e:
        raise TypeError(f"search problem {type(problem).__name__}: step(state, key) must return a state shaped "
                        f"exactly like init's and scalar metrics; {e}") from None


def _fingerprint(problem: PyTree, lanes: PyTree, key: np.ndarray, cfg: RunConfig) -> str:
    """Identifies a run in any process: the problem's arrays and static config, the lanes, the key, the budget."""
    return fingerprint(problem, lanes, key, (cfg.max_steps, cfg.chunk_steps))


@functools.lru_cache(maxsize=64)
def _chunk_fn(n_lanes: int, chunk_steps: int, max_steps: int, mesh):
    """The compiled program: `chunk_steps` masked, vmapped steps of every lane. One per shape of run, reused
    by every later run of the same shape in the process (jit's cache keys on the problem's type, static
    fields and array shapes), so a second search of the same shape does not compile again."""
    lanes = lane_sharding(mesh)

    def chunk(problem, carry, start_step):
        def one_step(carry, i):
            g = start_step + i
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(carry["lane_key"], g)
            new_state, metrics = jax.vmap(problem.step)(carry["state"], keys)
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
            live = ~carry["done"]
            finite = _nan_free_per_lane(new_state, n_lanes) & _nan_free_per_lane(metrics, n_lanes)
            advance = live & finite
            state = _tree_where(advance, new_state, carry["state"])
            steps = carry["steps"] + advance.astype(jnp.int32)
            failed_at = jnp.where(live & ~finite, g, carry["failed_at"])
            done = carry["done"] | (live & ~finite) | (advance & jax.vmap(problem.done)(state)) | (steps >= max_steps)
            metrics = jax.tree.map(lambda m: jnp.where(advance, m, jnp.nan), metrics)
            new_carry = dict(carry, state=state, steps=steps, failed_at=failed_at, done=done)
            return jax.lax.with_sharding_constraint(new_carry, lanes), metrics

        return jax.lax.scan(one_step, carry, jnp.arange(chunk_steps, dtype=jnp.int32))

    return jax.jit(chunk, out_shardings=(lanes, lane_sharding(mesh, 1)), donate_argnums=(1,))


@jax.jit
def _init_lanes(problem, keys, lanes):
    return jax.vmap(problem.init)(keys, lanes)


def run(problem: SearchProblem, lanes: PyTree, config: RunConfig = RunConfig(), *, desc: str = "search",
        on_chunk: Callable[[int, dict], None] | None = None) -> SearchResult:
    """Run `problem` on every lane of `lanes` (a pytree, leading axis R) until all are done.

    Lane keys come from `config.seed`; `config.restarts` is the capability's business (it builds the
    lanes). `on_chunk(steps_so_far, info)` is called on the host after every chunk (and its checkpoint);
    raising from it interrupts the run, which the same call resumes when `config.checkpoint_dir` is set.
    """
    key = np.asarray(jax.random.key_data(jax.random.key(config.seed)), np.uint32)
    lanes = jax.tree.map(np.asarray, lanes)
    sizes = {a.shape[0] if a.ndim else None for a in jax.tree.leaves(lanes)}
    if len(sizes) != 1 or None in sizes:
        raise InputError(f"every lane input needs the same leading (restart) axis; found sizes {sizes}")
    (n_real,) = sizes
    mesh = restart_mesh(config.devices)
    n_dev = mesh.devices.size
    n_lanes = math.ceil(n_real / n_dev) * n_dev
    lane_keys = np.asarray(jax.random.split(key, n_real))
    padded = _pad_lanes(lanes, n_lanes - n_real)
    padded_keys = _pad_lanes(lane_keys, n_lanes - n_real)

    def fresh_carry():
        state = _init_lanes(problem, padded_keys, padded)
        return dict(state=state, lane_key=padded_keys, steps=np.zeros(n_lanes, np.int32),
                    failed_at=np.full(n_lanes, -1, np.int32), done=np.arange(n_lanes) >= n_real)

    carry = jax.device_get(fresh_carry())
    n_chunks = math.ceil(config.max_steps / config.chunk_steps)
    total = n_chunks * config.chunk_steps
    step_state, metric_shapes = jax.eval_shape(jax.vmap(problem.step), carry["state"], padded_keys)
    _check_problem(problem, carry["state"], step_state, metric_shapes)
    history = {k: np.full((total, n_real), np.nan, np.float32) for k in metric_shapes}

    start_chunk = 0
    manager = None
    if config.checkpoint_dir is not None:
        manager, start_chunk, carry, history = _open_checkpoint(
            Path(config.checkpoint_dir), _fingerprint(problem, lanes, key, config), carry, history, n_real)

    chunk_fn = _chunk_fn(n_lanes, config.chunk_steps, config.max_steps, mesh)
    problem_dev = jax.device_put(problem, replicated(mesh))
    carry_dev = jax.device_put(carry, lane_sharding(mesh))

    bar = tqdm(total=total, initial=start_chunk * config.chunk_steps, desc=desc, unit="step",
               disable=not config.progress)
    done = np.asarray(carry["done"])
    try:
        with searching():   # a SIGTERM now stops the search after its next checkpoint
            for c in range(start_chunk, n_chunks):
                if done.all():
                    break
                carry_dev, metrics = chunk_fn(problem_dev, carry_dev, jnp.int32(c * config.chunk_steps))
                rows = slice(c * config.chunk_steps, (c + 1) * config.chunk_steps)
                for k, v in metrics.items():
                    history[k][rows] = np.asarray(v)[:, :n_real]
                done = np.asarray(carry_dev["done"])
                failed = int((np.asarray(carry_dev["failed_at"])[:n_real] >= 0).sum())
                if manager is not None:
                    _save(manager, c + 1, jax.device_get(carry_dev), history, n_real)
                bar.set_postfix(done=f"{int(done[:n_real].sum())}/{n_real}", failed=failed, refresh=False)
                bar.update(config.chunk_steps)
                if on_chunk is not None:
                    on_chunk((c + 1) * config.chunk_steps, {"done": done[:n_real], "failed": failed})
                stop_if_requested()
    finally:
        bar.close()

    final = jax.tree.map(lambda a: np.asarray(a)[:n_real], jax.device_get(carry_dev))
    ran = int(final["steps"].max(initial=0))
    last = max(ran, int((final["failed_at"].max(initial=-1)) + 1))
    return SearchResult(state=final["state"], metrics={k: v[:last] for k, v in history.items()},
                        steps=final["steps"], failed_at=final["failed_at"], done=final["done"],
                        resumed_from_step=start_chunk * config.chunk_steps)


# ----------------------------------------------------------------------------- checkpoints

MARKER = "jaxrisk-checkpoint.json"   # written first into a checkpoint directory jaxrisk creates
_OWN_ENTRY = re.compile(r"\d+(\.orbax-checkpoint-tmp-\d+)?")   # orbax's step directories (and their temporaries)


def _read_marker(marker: Path) -> str:
    recorded = json_object(marker, "a 'fingerprint' (a checkpoint marker jaxrisk wrote)").get("fingerprint")
    if not isinstance(recorded, str):
        raise InputError(f"{marker}: not a checkpoint marker jaxrisk wrote (no 'fingerprint'); move that directory "
                         "away or choose another output directory")
    return recorded


def _open_checkpoint(directory: Path, fingerprint: str, carry, history, n_real: int):
    """Open (or create) the checkpoint directory; restore the latest chunk if this run wrote it.

    Only a directory that is absent, empty, or marked by jaxrisk is used: anything else is refused,
    never deleted.
    """
    import orbax.checkpoint as ocp

    directory = directory.absolute()
    marker = directory / MARKER
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: exists and is not a directory (jaxrisk keeps its checkpoint there); "
                         "move it away or choose another output directory")
    if marker.exists():
        recorded = _read_marker(marker)
        if recorded != fingerprint:
            raise InputError(f"{directory}: holds a checkpoint of a different run (fingerprint {recorded}, this "
                             f"run is {fingerprint}); use another output directory or delete that one")
    else:
        if directory.exists() and any(directory.iterdir()):
            raise InputError(f"{directory}: holds files jaxrisk did not write (no {MARKER}); jaxrisk keeps its "
                             "checkpoint there and never deletes what it did not create: move them away or "
                             "choose another output directory")
        try:
            write_json(marker, {"fingerprint": fingerprint, "written_by": "jaxrisk"})
        except OSError as e:
            raise InputError(f"{directory}: cannot write a checkpoint there ({e.strerror})") from None
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=False))
    latest = manager.latest_step()
    if latest is None:
        return manager, 0, carry, history
    template = _saved_tree(carry, history, n_real)
    restored = manager.restore(latest, args=ocp.args.StandardRestore(template))
    n_lanes = carry["done"].shape[0]
    carry = jax.tree.map(lambda a: _pad_lanes(np.asarray(a), n_lanes - n_real), restored["carry"])
    history = {k: np.asarray(v) for k, v in restored["history"].items()}
    return manager, int(latest), carry, history


def _saved_tree(carry, history, n_real):
    """What a checkpoint holds: real lanes only, so a run can resume on a different device count."""
    return {"carry": jax.tree.map(lambda a: np.asarray(a)[:n_real], carry), "history": history}


def _save(manager, chunk: int, carry, history, n_real: int) -> None:
    import orbax.checkpoint as ocp

    manager.save(chunk, args=ocp.args.StandardSave(_saved_tree(carry, history, n_real)))
    manager.wait_until_finished()


def remove_checkpoint(directory: str | Path) -> None:
    """Delete what the engine wrote into `directory` (its marker and step directories), nothing else.

    The directory itself goes only when that leaves it empty; a directory without the marker is left alone.
    """
    directory = Path(directory)
    if not (directory / MARKER).is_file():
        return
    for entry in directory.iterdir():
        if _OWN_ENTRY.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry)
    (directory / MARKER).unlink()
    try:
        directory.rmdir()
    except OSError:   # someone put a file of their own there meanwhile: keep it (and the directory)
        pass
