"""The restart-parallel engine on a small problem whose answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LANES, PROBLEM, PROGRAM_BUILT
from jaxrisk.errors import InputError
from jaxrisk.search import RunConfig, run


def cfg(**kw):
    return RunConfig(**{"max_steps": 400, "chunk_steps": 16, "devices": 1, "progress": False, **kw})


def test_lanes_converge_and_stop_early():
    r = run(PROBLEM, LANES, cfg())
    ok = np.array([0, 1, 3, 4, 5])
    assert r.done.all()
    assert np.all(np.sum((r.state.x[ok] - LANES["target"][ok]) ** 2, axis=1) < 1e-3)
    assert r.steps.max() < 400  # stopped early, well before the budget
    assert r.metrics["loss"].shape == (r.steps.max(), 6)
    # slower step size needs more steps
    assert r.steps[3] > r.steps[0] > r.steps[5]


def test_nan_lane_is_frozen_and_reported_while_others_finish():
    r = run(PROBLEM, LANES, cfg())
    assert r.failed_at[2] >= 0 and (np.delete(r.failed_at, 2) == -1).all()
    assert np.isnan(r.metrics["loss"][r.failed_at[2]:, 2]).all()
    assert np.isfinite(r.state.x[2]).all()  # the last good state is kept
    others = np.array([0, 1, 3, 4, 5])
    assert np.all(np.sum((r.state.x[others] - LANES["target"][others]) ** 2, axis=1) < 1e-3)
    assert r.steps[3] > r.steps[2]  # a healthy lane went on after the failure


def test_eight_devices_equal_one():
    assert len(jax.devices()) == 8
    r1, r8 = run(PROBLEM, LANES, cfg(devices=1)), run(PROBLEM, LANES, cfg(devices=8))
    np.testing.assert_array_equal(r1.state.x, r8.state.x)
    np.testing.assert_array_equal(r1.steps, r8.steps)
    np.testing.assert_array_equal(r1.metrics["loss"], r8.metrics["loss"])


@pytest.mark.parametrize("lanes, used", [(2, 2), (6, 6), (10, 5), (9, 5), (16, 8), (17, 6)])
def test_devices_left_to_the_run_hold_no_idle_lanes(lanes, used):
    """8 devices, devices left to the run: as many as keep the lanes per device at what 8 would give."""
    from jaxrisk.mesh import RESTARTS
    from jaxrisk.search.engine import _fitted_mesh

    assert _fitted_mesh(cfg(devices=None), lanes).shape[RESTARTS] == used
    assert _fitted_mesh(cfg(devices=8), lanes).shape[RESTARTS] == 8   # a mesh the user asked for is kept


def test_a_fitted_mesh_gives_the_results_of_one_device():
    r1, fitted = run(PROBLEM, LANES, cfg(devices=1)), run(PROBLEM, LANES, cfg(devices=None))
    np.testing.assert_array_equal(r1.state.x, fitted.state.x)
    np.testing.assert_array_equal(r1.metrics["loss"], fitted.metrics["loss"])


def test_chunk_size_does_not_change_results():
    a, b = run(PROBLEM, LANES, cfg(chunk_steps=16)), run(PROBLEM, LANES, cfg(chunk_steps=5))
    np.testing.assert_array_equal(a.state.x, b.state.x)
    np.testing.assert_array_equal(a.steps, b.steps)


def test_restarts_differ_by_seed():
    a, b = run(PROBLEM, LANES, cfg()), run(PROBLEM, LANES, cfg(seed=1))
    assert not np.array_equal(a.metrics["loss"][0], b.metrics["loss"][0])


def test_second_chunk_compiles_nothing():
    compiles = []

    def listener(event, duration, **kw):
        if event in PROGRAM_BUILT:
            compiles.append(event)

    seen = {}

    def on_chunk(step, info):
        seen[step] = len(compiles)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run(PROBLEM, LANES, cfg(max_steps=64, chunk_steps=8, devices=8, seed=7), on_chunk=on_chunk)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    steps = sorted(seen)
    assert len(steps) >= 3
    assert seen[steps[0]] > 0  # the first chunk did compile (the listener works)
    assert seen[steps[-1]] == seen[steps[0]], f"compilations after each chunk: {seen}"


class Interrupt(Exception):
    pass


def _compiles():
    """A list that grows by one per XLA compilation while the returned context is open."""
    import contextlib

    seen = []

    def listener(event, duration, **kw):
        if event in PROGRAM_BUILT:
            seen.append(event)

    @contextlib.contextmanager
    def counting():
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            yield seen
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
    return counting()


def test_a_second_run_of_the_same_shape_compiles_nothing():
    other = {"target": LANES["target"] + 1.0, "lr": LANES["lr"]}   # other values, same shapes
    run(PROBLEM, LANES, cfg(max_steps=32, chunk_steps=8, devices=8, seed=11))
    with _compiles() as seen:
        again = run(PROBLEM, other, cfg(max_steps=32, chunk_steps=8, devices=8, seed=12))
    assert seen == [] and again.steps.max() > 0


@pytest.mark.parametrize("lanes,devices", [(2, 1), (3, 1), (2, 2), (1, 8)])
def test_a_work_queue_gives_every_item_the_result_it_gets_alone(lanes, devices):
    """Fewer lanes than items: finished lanes take the next item, and each item ends exactly as when all run
    at once (its keys fold in its own step, not the run's clock)."""
    every = run(PROBLEM, LANES, cfg(chunk_steps=4, seed=5))
    queued = run(PROBLEM, LANES, cfg(chunk_steps=4, seed=5, lanes=lanes, devices=devices))
    np.testing.assert_array_equal(queued.state.x, every.state.x)
    np.testing.assert_array_equal(queued.steps, every.steps)
    np.testing.assert_array_equal(queued.failed_at, every.failed_at)
    np.testing.assert_array_equal(queued.metrics["loss"], every.metrics["loss"])
    assert np.all(np.isfinite(queued.seconds))


def test_a_work_queue_keeps_lanes_busy():
    """Two lanes, six items of very different lengths: finished lanes take the next item at once, so the run is
    shorter than running the items in waves of two (each wave as long as its slowest item), and no longer than
    list scheduling allows (total work over two lanes, plus the longest item)."""
    chunks = []
    res = run(PROBLEM, LANES, cfg(chunk_steps=4, seed=5, lanes=2), on_chunk=lambda step, info: chunks.append(step))
    held = np.ceil(np.maximum(res.steps, res.failed_at + 1) / 4).astype(int)   # chunks each item holds its lane
    waves = sum(held[i:i + 2].max() for i in range(0, 6, 2))
    assert len(chunks) < waves, (held, len(chunks))
    assert len(chunks) <= np.ceil(held.sum() / 2) + held.max()


@pytest.mark.parametrize("compile_seconds,shrinks", [(0.0, True), (float("inf"), False)])
def test_the_tail_runs_on_fewer_lanes_when_that_pays(monkeypatch, compile_seconds, shrinks):
    """Once no item waits, the last items move onto fewer lanes (a smaller compiled chunk) if the idle lanes
    would cost more than that compile, judged by the program's own chunk times (the compile pinned here, and no
    smaller lane count compiled before); every item still ends exactly as without shrinking."""
    from jaxrisk.search import engine

    monkeypatch.setattr(engine, "_TIMINGS", {})

    kept = run(PROBLEM, LANES, cfg(chunk_steps=4, seed=5, shrink_lanes=False))
    lane_counts = []
    real_add = engine._ChunkTiming.add
    monkeypatch.setattr(engine._ChunkTiming, "add", lambda self, lanes, s: (lane_counts.append(lanes),
                                                                             real_add(self, lanes, s)))
    monkeypatch.setattr(engine._ChunkTiming, "compile", lambda self, lanes: compile_seconds)
    shrunk = run(PROBLEM, LANES, cfg(chunk_steps=4, seed=5))
    assert lane_counts[0] == 6 and (min(lane_counts) < 6) == shrinks, lane_counts
    assert lane_counts == sorted(lane_counts, reverse=True)
    for name in ("steps", "failed_at", "done"):
        np.testing.assert_array_equal(getattr(shrunk, name), getattr(kept, name))
    np.testing.assert_array_equal(shrunk.state.x, kept.state.x)
    np.testing.assert_array_equal(shrunk.metrics["loss"], kept.metrics["loss"])


def test_a_second_search_shrinks_onto_lane_counts_the_process_has_compiled(monkeypatch):
    """The chunk timings live with the compiled program for the process: a second search of the same shape
    moves its tail onto the smaller lane counts the first one compiled, however dear a new compile would be,
    and compiles no other (chunk times pinned in proportion to the lanes)."""
    from jaxrisk.search import engine

    monkeypatch.setattr(engine, "_TIMINGS", {})
    monkeypatch.setattr(engine._ChunkTiming, "steady", lambda self, lanes: float(lanes) if lanes in self.seconds
                        else None)
    runs = []
    for compile_seconds in (0.0, float("inf")):
        lane_counts = []
        real_add = engine._ChunkTiming.add
        monkeypatch.setattr(engine._ChunkTiming, "compile", lambda self, lanes, c=compile_seconds: c)
        monkeypatch.setattr(engine._ChunkTiming, "add", lambda self, lanes, s, seen=lane_counts, add=real_add: (
            seen.append(lanes), add(self, lanes, s)))
        run(PROBLEM, LANES, cfg(chunk_steps=4, seed=5))
        monkeypatch.setattr(engine._ChunkTiming, "add", real_add)
        runs.append(lane_counts)
    assert min(runs[0]) < 6 and runs[1] == runs[0], runs


def test_an_interrupted_queue_resumes_with_another_lane_count(tmp_path):
    full = run(PROBLEM, LANES, cfg(chunk_steps=4, seed=3))

    def kill_after_three_chunks(step, info):
        if step >= 12:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(PROBLEM, LANES, cfg(chunk_steps=4, lanes=3, checkpoint_dir=str(tmp_path), seed=3),
            on_chunk=kill_after_three_chunks)
    resumed = run(PROBLEM, LANES, cfg(chunk_steps=4, lanes=2, devices=2, checkpoint_dir=str(tmp_path), seed=3))
    assert resumed.resumed_from_step > 0
    np.testing.assert_array_equal(full.state.x, resumed.state.x)
    np.testing.assert_array_equal(full.metrics["loss"], resumed.metrics["loss"])




@pytest.mark.parametrize("devices_before,devices_after", [(1, 1), (8, 2)])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, devices_before, devices_after):
    full = run(PROBLEM, LANES, cfg(chunk_steps=4, seed=3))

    def kill_after_two_chunks(step, info):
        if step >= 8:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(PROBLEM, LANES, cfg(chunk_steps=4, devices=devices_before, checkpoint_dir=str(tmp_path), seed=3),
            on_chunk=kill_after_two_chunks)
    resumed = run(PROBLEM, LANES, cfg(chunk_steps=4, devices=devices_after, checkpoint_dir=str(tmp_path), seed=3))
    assert resumed.resumed_from_step == 8
    np.testing.assert_array_equal(full.state.x, resumed.state.x)
    np.testing.assert_array_equal(full.steps, resumed.steps)
    np.testing.assert_array_equal(full.failed_at, resumed.failed_at)
    np.testing.assert_array_equal(full.metrics["loss"], resumed.metrics["loss"])


def test_checkpoint_of_another_run_is_refused(tmp_path):
    run(PROBLEM, LANES, cfg(max_steps=8, chunk_steps=4, checkpoint_dir=str(tmp_path), seed=3))
    with pytest.raises(InputError, match="different run"):
        run(PROBLEM, LANES, cfg(max_steps=8, chunk_steps=4, checkpoint_dir=str(tmp_path), seed=4))


def test_lane_inputs_must_share_the_restart_axis():
    with pytest.raises(InputError, match="same leading"):
        run(PROBLEM, {"target": LANES["target"], "lr": LANES["lr"][:3]}, cfg())


def test_a_problem_whose_step_changes_the_state_shape_is_named():
    from flax import struct

    @struct.dataclass
    class Growing:
        def init(self, key, lane):
            return {"x": lane}

        def step(self, state, key):
            return {"x": jnp.concatenate([state["x"], state["x"]])}, {"n": jnp.float32(1)}

        def done(self, state):
            return jnp.asarray(False)

    with pytest.raises(TypeError, match=r"search problem Growing: step\(state, key\) must return a state shaped"):
        run(Growing(), np.zeros((2, 3), np.float32), cfg(max_steps=2))


def test_weights_already_on_the_mesh_stay_where_they_are():
    """The engine replicates plain arrays over the mesh but keeps an array the partition table placed on it."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxrisk.mesh import make_mesh, place

    mesh = make_mesh(8, tensor=4)
    split = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P("tensor")))
    placed = place({"w": split, "b": np.zeros(3, np.float32)}, mesh)
    assert placed["w"] is split
    assert placed["b"].sharding.is_fully_replicated and len(placed["b"].sharding.device_set) == 8
