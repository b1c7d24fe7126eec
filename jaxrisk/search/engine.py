"""The restart-parallel search engine every jaxrisk search runs on.

A search problem is pure and describes ONE search item (a class x restart, a behaviour x restart, ...):

    problem.init(key, item) -> state               # `item`: that item's slice of the item inputs
    problem.step(state, key) -> (state, metrics)   # metrics: dict of scalars
    problem.done(state) -> bool scalar

The problem itself is a pytree (e.g. a `flax.struct.dataclass`): its arrays (weights, data) are arguments of
the compiled program; its static fields are hyperparameters. The engine runs items on L lanes of one mesh
(`jaxrisk.mesh`): the lane axis is split over the mesh's restarts axis, each device running its own lanes
with no communication (a `shard_map`, so host callbacks stay per device), while the model axes (fsdp /
tensor) carry the weights as they were placed. It runs `chunk_steps` vmapped steps per call with
`lax.scan`, freezes finished or failed lanes by masking (shapes never change), checkpoints between chunks
with orbax, and between chunks hands a finished lane the next waiting item: with fewer lanes than items
(`RunConfig.lanes`) the items form a work queue and no lane idles for more than one chunk. Once no item waits
and at most half the lanes still run, the last items move onto fewer lanes (`RunConfig.shrink_lanes`) when
the idle lanes would cost more time than compiling the smaller chunk, judged by the run's own chunk times.
Checkpoints hold the item table, its item axis split over the restarts axis, so each host writes its shards.

Each step's key is `fold_in(item_key, step_of_that_item)`, so an item's result depends neither on the chunk
size, the lane count, the device count nor the order of the queue, and a resumed run replays exactly what
an uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxrisk.data.text import json_object
from jaxrisk.distributed import wait_for_every_process
from jaxrisk.errors import InputError
from jaxrisk.io import is_writer, write_json
from jaxrisk.mesh import RESTARTS, lane_sharding, place, put, replicated, to_host
from jaxrisk.preemption import searching, stop_if_requested
from jaxrisk.search.config import RunConfig
from jaxrisk.search.fingerprint import fingerprint

PyTree = Any
PENDING, STARTED, FINISHED = 0, 1, 2   # an item's status in the table


class SearchProblem(Protocol):
    def init(self, key: jax.Array, lane: PyTree) -> PyTree: ...

    def step(self, state: PyTree, key: jax.Array) -> tuple[PyTree, dict[str, jax.Array]]: ...

    def done(self, state: PyTree) -> jax.Array: ...


@dataclasses.dataclass
class SearchResult:
    state: PyTree  # final per-item states, numpy, leading axis N
    metrics: dict[str, np.ndarray]  # name -> [steps, N], row = the item's own step; NaN where it did not advance
    steps: np.ndarray  # [N] steps each item ran
    failed_at: np.ndarray  # [N] the item's step at which it produced a NaN, -1 if never
    done: np.ndarray  # [N]
    resumed_from_step: int  # 0 unless resumed from a checkpoint: the most steps any item had run then
    seconds: np.ndarray | None = None  # [N] wall time from the run's start to the end of the item's last chunk
    #                                   (a resumed run adds the time its earlier processes searched)


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


def _check_problem(problem, init_state: PyTree, step_state: PyTree, metrics: dict) -> None:
    """A problem's `step` keeps its state's structure, shapes and dtypes (else the compiled scan cannot carry
    it) and returns one scalar per metric and lane: said here, by name, not deep inside `lax.scan`."""
    try:
        chex.assert_trees_all_equal_shapes_and_dtypes(init_state, step_state)
        chex.assert_rank(list(metrics.values()), 1)   # vmapped scalars: [R]
    except (AssertionError, ValueError) as e:
        raise TypeError(f"search problem {type(problem).__name__}: step(state, key) must return a state shaped "
                        f"exactly like init's and scalar metrics; {e}") from None


def _fingerprint(problem: PyTree, items: PyTree, key: np.ndarray, cfg: RunConfig) -> str:
    """Identifies a run in any process: the problem's arrays and static config, the items, the key, the budget.
    The lane count and the mesh are left out: a run may resume with others."""
    return fingerprint(problem, items, key, cfg.max_steps, "item-table-v3")


@functools.lru_cache(maxsize=64)
def _chunk_fn(chunk_steps: int, max_steps: int, mesh):
    """The compiled program: `chunk_steps` masked, vmapped steps of every lane, each device on its own lanes.
    One per (problem structure, lane count, mesh): this cache and jit's own (keyed on the problem's type,
    static fields and array shapes) mean a second search of the same shape in the process compiles nothing."""

    def local_chunk(problem, carry):
        n = carry["done"].shape[0]

        def one_step(carry, _):
            keys = jax.vmap(jax.random.fold_in)(carry["lane_key"], carry["steps"])
            new_state, metrics = jax.vmap(problem.step)(carry["state"], keys)
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
            live = ~carry["done"]
            finite = _nan_free_per_lane(new_state, n) & _nan_free_per_lane(metrics, n)
            advance = live & finite
            state = _tree_where(advance, new_state, carry["state"])
            steps = carry["steps"] + advance.astype(jnp.int32)
            failed_at = jnp.where(live & ~finite, carry["steps"], carry["failed_at"])
            done = carry["done"] | (live & ~finite) | (advance & jax.vmap(problem.done)(state)) | (steps >= max_steps)
            metrics = jax.tree.map(lambda m: jnp.where(advance, m, jnp.nan), metrics)
            return dict(carry, state=state, steps=steps, failed_at=failed_at, done=done), metrics

        return jax.lax.scan(one_step, carry, None, length=chunk_steps)

    # lanes are manual (each device its own); model axes of size > 1 stay automatic, XLA splitting the weights'
    # work by their placement (host callbacks there go through `jaxrisk.mesh.host_callback`)
    manual = {name for name, size in mesh.shape.items() if name == RESTARTS or size == 1}
    chunk = jax.shard_map(local_chunk, mesh=mesh, in_specs=(P(), P(RESTARTS)),
                          out_specs=(P(RESTARTS), P(None, RESTARTS)), axis_names=manual, check_vma=False)
    return jax.jit(chunk, donate_argnums=(1,))


@jax.jit
def _init_items(problem, keys, items):
    return jax.vmap(problem.init)(keys, items)


def _rows(tree: PyTree, index: np.ndarray) -> PyTree:
    return jax.tree.map(lambda a: np.asarray(a)[index], tree)


def _set_rows(tree: PyTree, index: np.ndarray, rows: PyTree) -> PyTree:
    def one(a, r):
        a = np.array(a)   # writable copy (device_get may hand back read-only buffers)
        a[index] = r
        return a
    return jax.tree.map(one, tree, rows)


def _fitted_mesh(config: RunConfig, lanes: int):
    """The run's mesh. With the devices left to the run (`devices=None`, one process), the restarts axis takes
    only as many devices as keep the lanes per device what every device would give: 10 lanes on 8 devices run
    as 2 per device on 5 devices, not on 16 lanes of which 6 idle. Wall time on parallel devices is the same;
    devices that share cores (a CPU's) no longer compute lanes that hold nothing."""
    mesh = config.mesh()
    shards = mesh.shape[RESTARTS]
    if config.devices is not None or jax.process_count() > 1:
        return mesh
    per_device = math.ceil(lanes / shards)
    used = math.ceil(lanes / per_device)
    if used == shards:
        return mesh
    return config.replace(devices=used * config.fsdp * config.tensor).mesh()


def run(problem: SearchProblem, items: PyTree, config: RunConfig = RunConfig(), *, desc: str = "search",
        on_chunk: Callable[[int, dict], None] | None = None) -> SearchResult:
    """Run `problem` on every item of `items` (a pytree, leading axis N) until all are done.

    Item keys come from `config.seed`; `config.restarts` is the capability's business (it builds the items);
    `config.lanes` items run at once (all by default). `on_chunk(steps_so_far, info)` (the run's clock: chunks
    x chunk_steps) is called on the host after every chunk (and its checkpoint) with info {"done": [N] bool,
    "failed": count}; raising from it interrupts the run, which the same call resumes when
    `config.checkpoint_dir` is set.
    """
    key = np.asarray(jax.random.key_data(jax.random.key(config.seed)), np.uint32)
    items = jax.tree.map(np.asarray, items)
    sizes = {a.shape[0] if a.ndim else None for a in jax.tree.leaves(items)}
    if len(sizes) != 1 or None in sizes:
        raise InputError(f"every item input needs the same leading (restart) axis; found sizes {sizes}")
    (n_items,) = sizes
    at_once = min(config.lanes or n_items, n_items)
    mesh = _fitted_mesh(config, at_once)
    shards = mesh.shape[RESTARTS]
    n_lanes = math.ceil(at_once / shards) * shards
    item_keys = np.asarray(jax.random.split(key, n_items))

    # the item table: every item's carry row (started items hold their progress), its status and its history
    table = dict(state=jax.device_get(_init_items(problem, item_keys, items)), lane_key=item_keys,
                 steps=np.zeros(n_items, np.int32), failed_at=np.full(n_items, -1, np.int32),
                 done=np.zeros(n_items, bool))
    status = np.full(n_items, PENDING, np.int8)
    seconds = np.full(n_items, np.nan)
    step_state, metric_shapes = jax.eval_shape(jax.vmap(problem.step), table["state"], item_keys)
    _check_problem(problem, table["state"], step_state, metric_shapes)
    history = {k: np.full((config.max_steps, n_items), np.nan, np.float32) for k in metric_shapes}

    if config.checkpoint_dir is not None:
        importlib.import_module("orbax.checkpoint")   # slow to import: before the barrier, not between it and orbax's
    wait_for_every_process("search")   # the checkpoint's and the chunk's collectives need every host here
    manager, chunks = None, 0   # chunks: run so far, in this process and the ones it resumes (the checkpoint step)
    if config.checkpoint_dir is not None:
        manager, chunks, restored = _open_checkpoint(Path(config.checkpoint_dir),
                                                     _fingerprint(problem, items, key, config),
                                                     _saved(table, status, history, seconds, 0.0), mesh)
        table, status, history, seconds = (restored[k] for k in ("table", "status", "history", "seconds"))
        clock = float(restored["clock"])   # seconds the earlier processes searched; their in-flight items wait again
    else:
        clock = 0.0
    resumed_from = int(table["steps"].max(initial=0))

    chunk_fn = _chunk_fn(config.chunk_steps, config.max_steps, mesh)
    problem_dev = place(problem, mesh)
    table = jax.tree.map(np.array, table)   # writable: rows are stored into it in place
    # which item each lane holds; a finished item stays on its lane (frozen, on the device) until the lane is
    # needed for a waiting item, so the carry only comes to the host to refill, to checkpoint and at the end
    lane_item = np.full(n_lanes, -1)
    carry = _rows(table, np.zeros(n_lanes, int))
    carry["done"] = np.ones(n_lanes, bool)
    carry, lane_item = _fill_lanes(table, status, carry, lane_item)
    carry_dev = put(carry, lane_sharding(mesh))
    steps = carry["steps"]
    t0 = time.perf_counter() - clock   # a resumed run's clock goes on from its checkpoint

    waves = math.ceil(int((status != FINISHED).sum()) / n_lanes)   # the most steps left: every wave runs its budget
    bar = tqdm(total=waves * config.max_steps, desc=desc, unit="step", disable=not config.progress)
    timing = _timing_of(chunk_fn, problem_dev, carry)
    try:
        with searching():   # a SIGTERM now stops the search after its next checkpoint
            while _running(lane_item, status).any():
                started = time.perf_counter()
                carry_dev, metrics = chunk_fn(problem_dev, carry_dev)
                if jax.process_count() > 1:   # a host still compiling must not time out the others' gather
                    jax.block_until_ready(carry_dev)
                    wait_for_every_process("chunk")
                running = _running(lane_item, status)
                steps_before, (metrics, steps, done) = steps, to_host((metrics, carry_dev["steps"], carry_dev["done"]))
                timing.add(n_lanes, time.perf_counter() - started)
                _record_history(history, metrics, np.where(running, lane_item, -1), steps_before, steps)
                finished = running & done
                status[lane_item[finished]] = FINISHED
                seconds[lane_item[finished]] = time.perf_counter() - t0
                chunks += 1
                refill = finished.any() and bool(_waiting(lane_item, status).size)
                fewer = n_lanes if refill or not config.shrink_lanes else _fewer_lanes(
                    lane_item, status, steps, n_lanes, shards, config, timing)
                if refill or fewer < n_lanes or manager is not None:
                    carry = to_host(carry_dev)
                    _store(table, carry, lane_item)
                if refill or fewer < n_lanes:
                    if refill:
                        carry, lane_item = _fill_lanes(table, status, carry, lane_item)
                    else:
                        carry, lane_item = _shrink(carry, lane_item, status, fewer)
                        n_lanes = fewer
                    carry_dev, steps = put(carry, lane_sharding(mesh)), carry["steps"]
                if manager is not None:
                    _save(manager, chunks, _saved(table, status, history, seconds, time.perf_counter() - t0), mesh)
                failed = int((table["failed_at"] >= 0).sum())
                bar.set_postfix(done=f"{int((status == FINISHED).sum())}/{n_items}", failed=failed, refresh=False)
                bar.update(min(config.chunk_steps, bar.total - bar.n))   # the last chunk may run past the budget
                if on_chunk is not None:
                    on_chunk(chunks * config.chunk_steps, {"done": status == FINISHED, "failed": failed})
                stop_if_requested(chunks)
        _store(table, to_host(carry_dev), lane_item)
    finally:
        bar.close()

    ran = int(max(table["steps"].max(initial=0), table["failed_at"].max(initial=-1) + 1))
    return SearchResult(state=table["state"], metrics={k: v[:ran] for k, v in history.items()},
                        steps=table["steps"], failed_at=table["failed_at"], done=table["done"],
                        resumed_from_step=resumed_from, seconds=seconds)


def _saved(table, status, history, seconds, clock: float) -> dict:
    """What a checkpoint holds: the item table, each item's status, history and finishing time, and the clock."""
    return dict(table=table, status=status, history=history, seconds=seconds, clock=np.asarray(clock, np.float64))


_HOST = -1   # a saved leaf written whole by process 0: the clock, and the float64 finishing times


def _item_axes(saved: dict) -> dict:
    """Each saved leaf's item axis (history rows are steps), or _HOST."""
    return {name: jax.tree.map(lambda _: _HOST if name in ("clock", "seconds") else int(name == "history"), part)
            for name, part in saved.items()}


def _sharded(saved: dict, mesh) -> dict:
    """The saved table as global arrays whose item axis is split over the restarts axis (padded to whole shards),
    so that in a job of several hosts each host's orbax writes the shards its own devices hold."""
    shards = mesh.shape[RESTARTS]

    def one(a, axis):
        if axis == _HOST:
            return a
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, -a.shape[axis] % shards)
        return put(np.pad(a, pad), lane_sharding(mesh, axis))
    return jax.tree.map(one, saved, _item_axes(saved))


def _restore(manager, step: int, fresh: dict, mesh) -> dict:
    """A saved table, read as shards of this run's mesh where the saved (padded) item count splits over it (the
    run that wrote it may have had other devices or hosts), then whole on the host, trimmed to the items."""
    import orbax.checkpoint as ocp

    shards = mesh.shape[RESTARTS]
    padded = manager.item_metadata(step).tree["status"].shape[0]   # the item count the saving run padded to

    def target(like, axis):
        if axis == _HOST:
            return like
        shape = like.shape[:axis] + (padded,) + like.shape[axis + 1:]
        sharding = lane_sharding(mesh, axis) if padded % shards == 0 else replicated(mesh)
        return jax.ShapeDtypeStruct(shape, like.dtype, sharding=sharding)

    axes = _item_axes(fresh)
    restored = to_host(manager.restore(step, args=ocp.args.StandardRestore(jax.tree.map(target, fresh, axes))))

    def trim(a, like, axis):
        return np.array(a if axis == _HOST else np.take(a, np.arange(like.shape[axis]), axis=axis))   # writable
    return jax.tree.map(trim, restored, fresh, axes)


def _running(lane_item: np.ndarray, status: np.ndarray) -> np.ndarray:
    """[L] lanes holding an item that has not finished."""
    held = lane_item >= 0
    running = held.copy()
    running[held] = status[lane_item[held]] != FINISHED
    return running


def _waiting(lane_item: np.ndarray, status: np.ndarray) -> np.ndarray:
    """Unfinished items on no lane (not started, or started by a run this one resumes), in item order."""
    unfinished = np.flatnonzero(status != FINISHED)
    return unfinished[~np.isin(unfinished, lane_item)]


def _store(table, carry, lane_item: np.ndarray) -> None:
    """Write every lane's row into its item's row of the table (in place)."""
    held = np.flatnonzero(lane_item >= 0)
    for t, c in zip(jax.tree.leaves(table), jax.tree.leaves(carry)):
        t[lane_item[held]] = np.asarray(c)[held]


def _fill_lanes(table, status, carry, lane_item):
    """Give every lane without a running item the next waiting item (its row from the table: a fresh start, or the
    progress of a run this one resumes): host-side row copies, so the compiled chunk never changes shape. Lanes
    must be stored (`_store`) first: a finished item's final row is overwritten here."""
    idle = np.flatnonzero(~_running(lane_item, status))
    waiting = _waiting(lane_item, status)[: len(idle)]
    if len(waiting) == 0:
        return carry, lane_item
    lanes = idle[: len(waiting)]
    carry = _set_rows(carry, lanes, _rows(table, waiting))
    lane_item = lane_item.copy()
    lane_item[lanes] = waiting
    status[waiting] = STARTED
    return carry, lane_item


class _ChunkTiming:
    """Wall time of one compiled program's chunks per lane count, kept for the process (a second search of the
    same shape knows what the first paid): the first chunk of a lane count includes its compile."""

    def __init__(self):
        self.seconds: dict[int, list[float]] = {}

    def add(self, lanes: int, seconds: float) -> None:
        times = self.seconds.setdefault(lanes, [])
        times[1:] = times[1:][-8:]   # the compile chunk and the latest steady ones
        times.append(seconds)

    def steady(self, lanes: int) -> float | None:
        """A chunk's time without compiling (the latest chunk after the first), None before there is one."""
        times = self.seconds.get(lanes, [])
        return times[-1] if len(times) > 1 else None

    def compile(self, lanes: int) -> float:
        """What compiling (or loading) the chunk of `lanes` lanes cost."""
        times = self.seconds[lanes]
        return max(times[0] - min(times[1:]), 0.0)


_TIMINGS: dict[tuple, _ChunkTiming] = {}


def _timing_of(chunk_fn, problem, carry) -> _ChunkTiming:
    """The process's chunk timing of this program: the chunk function (steps, mesh) and the problem's and one
    lane's structure and shapes, which is what jit compiles for besides the lane count."""
    def shapes(tree, lead: int):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple((np.shape(a)[lead:], str(getattr(a, "dtype", type(a)))) for a in leaves)
    key = (chunk_fn, shapes(problem, 0), shapes(carry, 1))
    if key not in _TIMINGS and len(_TIMINGS) >= 256:
        _TIMINGS.clear()
    return _TIMINGS.setdefault(key, _ChunkTiming())


def _fewer_lanes(lane_item, status, steps, n_lanes: int, shards: int, config: RunConfig,
                 timing: _ChunkTiming) -> int:
    """The tail of a search: no item waits and some lanes idle. The lane count the running items need (whole
    lanes on every device) if that pays: the chunks they may still run (their step budget) x the time saved per
    chunk (measured when that lane count already ran, else in proportion to the lanes) beat the compile (none
    when that lane count already ran in this process, else what this program's first chunk paid). Otherwise
    `n_lanes`. Every process of a job takes process 0's answer (the chunk's shape must agree)."""
    running = _running(lane_item, status)
    target = max(shards, math.ceil(int(running.sum()) / shards) * shards)
    chunk_seconds = timing.steady(n_lanes)
    if not running.any() or _waiting(lane_item, status).size or target >= n_lanes or chunk_seconds is None:
        return n_lanes
    chunks_left = math.ceil(int((config.max_steps - steps[running]).max()) / config.chunk_steps)
    smaller = timing.steady(target)
    saved = chunks_left * (chunk_seconds - (chunk_seconds * target / n_lanes if smaller is None else smaller))
    compile_seconds = 0.0 if target in timing.seconds else timing.compile(n_lanes)
    target = target if saved > compile_seconds else n_lanes
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        target = int(multihost_utils.broadcast_one_to_all(np.int32(target)))
    return target


def _shrink(carry, lane_item, status, lanes: int):
    """The running items' rows on the first `lanes` lanes (stored first), padded with finished lanes."""
    running = _running(lane_item, status)
    order = np.concatenate([np.flatnonzero(running), np.flatnonzero(~running)])[:lanes]
    return _rows(carry, order), np.where(running[order], lane_item[order], -1)


def _record_history(history, metrics, lane_item, steps_before, steps_after) -> None:
    """Chunk metrics [chunk, L] into each item's rows: a lane advances on consecutive steps from its chunk start."""
    for lane in np.flatnonzero(lane_item >= 0):
        start, ran = int(steps_before[lane]), int(steps_after[lane] - steps_before[lane])
        for k, v in metrics.items():
            history[k][start:start + ran, lane_item[lane]] = v[:ran, lane]


# ----------------------------------------------------------------------------- checkpoints

MARKER = "jaxrisk-checkpoint.json"   # written first into a checkpoint directory jaxrisk creates
_OWN_ENTRY = re.compile(r"\d+(\.orbax-checkpoint-tmp-\d+)?")   # orbax's step directories (and their temporaries)


def _read_marker(marker: Path) -> str:
    recorded = json_object(marker, "a 'fingerprint' (a checkpoint marker jaxrisk wrote)").get("fingerprint")
    if not isinstance(recorded, str):
        raise InputError(f"{marker}: not a checkpoint marker jaxrisk wrote (no 'fingerprint'); move that directory "
                         "away or choose another output directory")
    return recorded


def _open_checkpoint(directory: Path, fingerprint: str, fresh: PyTree, mesh):
    """Open (or create) the checkpoint directory; restore the latest saved table if this run wrote it.

    Only a directory that is absent, empty, or marked by jaxrisk is used: anything else is refused,
    never deleted. `fresh` is the table of a run with nothing done (and the template of a saved one).
    """
    import orbax.checkpoint as ocp

    directory = directory.absolute()
    marker = directory / MARKER
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: exists and is not a directory (jaxrisk keeps its checkpoint there); "
                         "move it away or choose another output directory")
    marked = marker.exists()
    if marked:
        recorded = _read_marker(marker)
        if recorded != fingerprint:
            raise InputError(f"{directory}: holds a checkpoint of a different run (fingerprint {recorded}, this "
                             f"run is {fingerprint}); use another output directory or delete that one")
    elif directory.exists() and any(directory.iterdir()):
        raise InputError(f"{directory}: holds files jaxrisk did not write (no {MARKER}); jaxrisk keeps its "
                         "checkpoint there and never deletes what it did not create: move them away or "
                         "choose another output directory")
    # every host has looked before one writes (a host looking later would take the marker being written for
    # files of someone else's), and one host writes
    wait_for_every_process("checkpoint-checked")
    if not marked and is_writer():
        try:
            write_json(marker, {"fingerprint": fingerprint, "written_by": "jaxrisk"})
        except OSError as e:
            raise InputError(f"{directory}: cannot write a checkpoint there ({e.strerror})") from None
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=False), item_handlers=ocp.StandardCheckpointHandler())
    latest = manager.latest_step()
    if latest is None:
        return manager, 0, fresh
    return manager, int(latest), _restore(manager, latest, fresh, mesh)


def _save(manager, chunk: int, saved: dict, mesh) -> None:
    """The item table (every item's state and history; small beside the weights, which are never saved), each
    host writing its own shards."""
    import orbax.checkpoint as ocp

    manager.save(chunk, args=ocp.args.StandardSave(_sharded(saved, mesh)))
    manager.wait_until_finished()


def remove_checkpoint(directory: str | Path) -> None:
    """Delete what the engine wrote into `directory` (its marker and step directories), nothing else.

    The directory itself goes only when that leaves it empty; a directory without the marker is left alone.
    """
    directory = Path(directory)
    if not is_writer() or not (directory / MARKER).is_file():   # in a multi-process job process 0 removes it
        return
    for entry in directory.iterdir():
        if _OWN_ENTRY.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry)
    (directory / MARKER).unlink()
    try:
        directory.rmdir()
    except OSError:   # someone put a file of their own there meanwhile: keep it (and the directory)
        pass
