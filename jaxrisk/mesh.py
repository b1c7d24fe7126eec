"""The one device mesh: a restarts axis for search lanes and model axes (fsdp / tensor) for the weights.

Every search lays its lanes along `restarts`; a model's parameters are placed on `fsdp` and `tensor` by the
partition table (`jaxrisk.models.sharding`). One mesh, built from the run configuration, serves both, so a
model sharded at load time stays sharded while it is searched.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrisk.errors import InputError

RESTARTS, FSDP, TENSOR = "restarts", "fsdp", "tensor"
AXES = (RESTARTS, FSDP, TENSOR)


def make_mesh(devices: int | None = None, *, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A (restarts, fsdp, tensor) mesh over the first `devices` devices (all, on every host, by default);
    the restarts axis gets what the model axes leave: devices / (fsdp * tensor)."""
    every = jax.devices()
    n = len(every) if devices is None else int(devices)
    if not 1 <= n <= len(every):
        raise InputError(f"asked for {n} devices; {'this host sees' if jax.process_count() == 1 else 'the job has'} "
                         f"{len(every)} ({every[0].platform})")
    model = int(fsdp) * int(tensor)
    if fsdp < 1 or tensor < 1 or n % model:
        raise InputError(f"a mesh of {n} devices cannot hold fsdp={fsdp} x tensor={tensor}: the model axes must "
                         f"be positive and their product must divide the device count")
    auto = (jax.sharding.AxisType.Auto,) * 3   # XLA propagates the weights' shardings through the forward pass
    return jax.make_mesh((n // model, fsdp, tensor), AXES, axis_types=auto, devices=every[:n])


def lane_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Shard axis `leading_axes` (the lane axis) over the restarts axis; replicate the rest."""
    return NamedSharding(mesh, P(*([None] * leading_axes), RESTARTS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree, sharding: NamedSharding):
    """Host values (the same in every process) as global arrays laid out by `sharding`; in one process a plain
    `device_put`, across processes each one fills only the shards its own devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
    return jax.tree.map(one, tree)


def to_host(tree):
    """Global arrays as numpy, whole, in every process (gathered from the other hosts' devices when needed)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
                        if isinstance(a, jax.Array) and not a.is_fully_addressable else np.asarray(a), tree)


def place(tree, mesh: Mesh):
    """Arrays already laid out on `mesh` (weights sharded by the partition table) stay where they are; every other
    array is replicated over it."""
    def one(a):
        sharding = getattr(a, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return a
        return put(a, replicated(mesh))
    return jax.tree.map(one, tree)


def host_callback(fn, result_shape, *args):
    """`jax.pure_callback(fn, result_shape, *args)` (batched along a leading axis under vmap) that also works inside
    the engine's per-device program when the weights are split over model axes: XLA runs callbacks only where
    every mesh axis is manual, so the call is wrapped in a `shard_map` over those axes, the arguments replicated
    on them (each device of a model group runs `fn` on the same values and keeps its own copy of the answer)."""
    call = functools.partial(jax.pure_callback, fn, result_shape, vmap_method="expand_dims")
    mesh = jax.sharding.get_abstract_mesh()
    auto = set() if mesh.empty else {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                                     if kind == jax.sharding.AxisType.Auto}
    if not auto:
        return call(*args)
    return jax.shard_map(call, in_specs=P(), out_specs=P(), axis_names=auto, check_vma=False)(*args)
