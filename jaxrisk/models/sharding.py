"""One table of partition specs for the transformer parameters, on the model axes (fsdp / tensor) of the one
mesh (`jaxrisk.mesh.make_mesh`; its restarts axis holds search lanes and never splits a weight).

A mesh axis is dropped from a spec (that dimension replicated) when the mesh
lacks it or the dimension does not divide evenly, so any mesh shape is valid.
"""

from __future__ import annotations

import re

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# (regex on the '/'-joined parameter path, spec per dimension). First match wins.
PARTITION_RULES: tuple[tuple[str, tuple], ...] = (
    (r"^embed$", ("tensor", "fsdp")),                        # [V, D]
    (r"^pos_embed$", (None, "fsdp")),                        # [P, D]
    (r"attn/[qkv]_kernel$", ("fsdp", "tensor", None)),       # [D, H, Dh]
    (r"attn/[qkv]_bias$", ("tensor", None)),                 # [H, Dh]
    (r"attn/o_kernel$", ("tensor", None, "fsdp")),           # [H, Dh, D]
    (r"mlp/(gate|up)_kernel$", ("fsdp", "tensor")),          # [D, F]
    (r"mlp/(gate|up)_bias$", ("tensor",)),                   # [F]
    (r"mlp/down_kernel$", ("tensor", "fsdp")),               # [F, D]
    (r"^lm_head$", ("fsdp", "tensor")),                      # [D, V]
    (r".*", ()),                                             # norms, output biases: replicated
)


def partition_spec(path: tuple, shape: tuple[int, ...], mesh) -> P:
    name = "/".join(str(p) for p in path)
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, name):
            break
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    dims = []
    for axis, dim in zip(spec, shape):
        ok = axis is not None and axis in sizes and dim % sizes[axis] == 0
        dims.append(axis if ok else None)
    return P(*dims)


def param_shardings(flat_shapes: dict[tuple, tuple[int, ...]], mesh) -> dict[tuple, NamedSharding]:
    """NamedSharding per parameter path, from PARTITION_RULES."""
    return {path: NamedSharding(mesh, partition_spec(path, shape, mesh)) for path, shape in flat_shapes.items()}


def sharded_fraction(flat_shapes: dict[tuple, tuple[int, ...]], mesh) -> float:
    """Largest per-device share of all parameters (1/n_devices when everything divides)."""
    total = per_device = 0
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    for path, shape in flat_shapes.items():
        spec = partition_spec(path, shape, mesh)
        n = int(np.prod(shape))
        split = int(np.prod([sizes[a] for a in spec if a is not None])) if len(spec) else 1
        total += n
        per_device += n / split
    return per_device / total
