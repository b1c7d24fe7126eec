"""Memory planning for a GCG search, before it runs: per-device bytes for the weights, the lanes' state and the
candidate batch, and the widest search that fits.

Nothing is guessed from a formula: the engine's own compiled chunk is lowered ahead of time on abstract
arguments (`jax.ShapeDtypeStruct`s carrying the partition table's shardings on the run's mesh) and XLA's
buffer assignment reports what it needs. Compiling all 32 layers of an 8B model would take minutes, so the
program is compiled with 2 and 3 layers and the temporary bytes are extended linearly in the layer count
(each further layer adds its own activations for the gradient); weights and lane state are counted exactly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxrisk.errors import InputError
from jaxrisk.mesh import RESTARTS, lane_sharding
from jaxrisk.models.lm_config import LMConfig
from jaxrisk.models.sharding import partition_spec
from jaxrisk.models.transformer import CausalLM
from jaxrisk.redteam.config import GCGConfig
from jaxrisk.redteam.problem import GCGProblem
from jaxrisk.search.config import RunConfig
from jaxrisk.search.engine import _chunk_fn

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one GCG search on one mesh."""
    search_width: int
    lanes: int                 # lanes of the whole mesh (behaviours x restarts run at once)
    lanes_per_device: int
    weights: int               # this device's share of the weights, by the partition table
    lane_state: int            # its lanes' carried state (suffixes, prompts, targets, the engine's own fields)
    candidates: int            # XLA's temporary buffers for one step of its lanes: candidate batch, gradients
    n_layers: int

    @property
    def total(self) -> int:
        return self.weights + self.lane_state + self.candidates

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def abstract_params(cfg: LMConfig, dtype, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as shape/dtype/sharding only (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        sharding = NamedSharding(mesh, partition_spec(path, value.shape, mesh))
        flat[path] = nnx.Param(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
    return graphdef, nnx.from_flat_state(flat)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of every array in `tree` (its largest shard of each)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _compiled(cfg: LMConfig, dtype, mesh, gcg: GCGConfig, n_lanes: int, prompt_len: int, target_len: int,
              after_len: int, max_steps: int = RunConfig().max_steps):
    """The engine's chunk (one step) for this model and these lanes, compiled on abstract arguments."""
    graphdef, params = abstract_params(cfg, dtype, mesh)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
    problem = GCGProblem(params=params, after=spec((after_len,)), allowed=spec((cfg.vocab_size,), jnp.bool_),
                         init_suffix=spec((gcg.suffix_len,)), graphdef=graphdef,
                         cfg=dataclasses.replace(gcg, filter_retokenization=False), max_steps=max_steps)
    lanes = lane_sharding(mesh)
    row = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct((n_lanes, *shape), dtype, sharding=lanes)  # noqa: E731
    items = dict(before=row(prompt_len), before_valid=row(prompt_len, dtype=jnp.bool_), goal=row(prompt_len),
                 goal_valid=row(prompt_len, dtype=jnp.bool_), target=row(target_len),
                 target_valid=row(target_len, dtype=jnp.bool_))
    key = jax.random.key_data(jax.random.key(0))
    lane_key = row(*key.shape, dtype=key.dtype)
    state = jax.eval_shape(lambda p, k, i: jax.vmap(p.init)(k, i), problem, lane_key, items)   # problem: abstract too
    carry = dict(state=jax.tree.map(lambda a: row(*a.shape[1:], dtype=a.dtype), state), lane_key=lane_key,
                 steps=row(), failed_at=row(), done=row(dtype=jnp.bool_))
    compiled = _chunk_fn(1, 1, mesh).lower(problem, carry).compile()
    return compiled.memory_analysis(), carry


def plan_gcg(cfg: LMConfig, *, dtype=jnp.bfloat16, run: RunConfig = RunConfig(), gcg: GCGConfig = GCGConfig(),
             lanes: int = 8, prompt_len: int = 32, target_len: int = 16, after_len: int = 8) -> MemoryPlan:
    """Per-device memory of GCG on `cfg` with `lanes` lanes on `run.mesh()` (which needs that many local devices;
    `jaxrisk plan` simulates them on the CPU)."""
    if gcg.topk > cfg.vocab_size:
        raise InputError(f"--topk {gcg.topk}: more than the model's {cfg.vocab_size} tokens")
    mesh = run.mesh()
    shards = mesh.shape[RESTARTS]
    n_lanes = math.ceil(lanes / shards) * shards
    # XLA's temporaries jump from 1 to 2 layers (two layers' buffers live at once in the backward pass), then grow
    # by the same amount per layer: compile 2 and 3 layers and extend (or compile the model whole if it is small)
    sizes = (cfg.n_layers,) if cfg.n_layers <= 3 else (2, 3)
    temps = {}
    for layers in sizes:
        small = dataclasses.replace(cfg, n_layers=layers)
        analysis, carry = _compiled(small, dtype, mesh, gcg, n_lanes, prompt_len, target_len, after_len,
                                   run.max_steps)
        if analysis is None:
            raise InputError(f"XLA on {jax.devices()[0].platform} reports no memory analysis; plan on the CPU")
        temps[layers] = analysis.temp_size_in_bytes
    per_layer = max(temps[3] - temps[2], 0) if len(sizes) == 2 else 0
    candidates = temps[sizes[0]] + per_layer * (cfg.n_layers - sizes[0])
    weights = _per_device_bytes(abstract_params(cfg, dtype, mesh)[1])
    return MemoryPlan(search_width=gcg.search_width, lanes=n_lanes, lanes_per_device=n_lanes // shards,
                      weights=weights, lane_state=_per_device_bytes(carry),
                      candidates=candidates, n_layers=cfg.n_layers)


def widest_fitting(cfg: LMConfig, memory_bytes: int, *, widths=(64, 128, 256, 512, 1024, 2048), **kw):
    """The plan at each search width, and the widest whose total fits `memory_bytes` (None if none does)."""
    base = kw.pop("gcg", GCGConfig())
    plans = [plan_gcg(cfg, gcg=dataclasses.replace(base, search_width=w), **kw) for w in widths]
    fitting = [p for p in plans if p.total <= memory_bytes]
    return plans, (fitting[-1].search_width if fitting else None)
