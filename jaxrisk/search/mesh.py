"""Device meshes for the restart axis."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrisk.errors import InputError

RESTARTS = "restarts"


def restart_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `n_devices` devices (all by default); its axis is the restart axis."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else int(n_devices)
    if not 1 <= n <= len(devices):
        raise InputError(f"asked for {n} devices; this host sees {len(devices)} ({devices[0].platform})")
    return jax.make_mesh((n,), (RESTARTS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def lane_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Shard axis `leading_axes` (the restart axis) over the mesh; replicate the rest."""
    return NamedSharding(mesh, P(*([None] * leading_axes), RESTARTS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
