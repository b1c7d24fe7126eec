"""Streaming activation statistics: per-batch moments under `jit` (float32, centred on the batch mean, so
nothing cancels), merged across batches on the host in float64 (Chan et al.'s pairwise update); Ledoit-Wolf
shrinkage from a second pass; whitening; a trimmed robust estimate for untrusted data."""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrisk.errors import InputError
from jaxrisk.mesh import RESTARTS, lane_sharding


class Moments(NamedTuple):
    count: int
    mean: np.ndarray        # [D] float64
    scatter: np.ndarray     # [D, D] float64: sum over rows of (x - mean)(x - mean)^T


@jax.jit
def _batch_moments(x_nd, w_n):
    """(mean [D], scatter about it [D, D]) of the rows with weight 1 (padding rows weigh 0); under jit the
    rows may be sharded over devices (the sums become collectives)."""
    mean = jnp.sum(w_n[:, None] * x_nd, axis=0) / jnp.sum(w_n)
    centred = (x_nd - mean) * w_n[:, None]
    return mean, centred.T @ centred


@jax.jit
def _fourth_moment(x_nd, mean_d):
    """sum over rows of ||x - mean||^4 (Ledoit-Wolf's second pass)."""
    return jnp.sum(jnp.sum(jnp.square(x_nd - mean_d), axis=1) ** 2)


def batches(x_nd: np.ndarray, size: int) -> Iterable[np.ndarray]:
    for i in range(0, len(x_nd), size):
        yield x_nd[i:i + size]


def merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two sets of rows."""
    if a.count == 0:
        return b
    n = a.count + b.count
    delta = b.mean - a.mean
    return Moments(n, a.mean + delta * (b.count / n),
                   a.scatter + b.scatter + np.outer(delta, delta) * (a.count * b.count / n))


def moments(rows: Iterable[np.ndarray], mesh=None) -> Moments:
    """Streaming moments of the rows of every batch [n_i, D] in `rows`; with a `mesh`, each batch's rows
    are sharded over its devices (padded to a multiple of them with rows of weight 0)."""
    total = None
    for x in rows:
        w = np.ones(len(x), np.float32)
        if mesh is not None and mesh.size > 1:
            pad = -len(x) % mesh.shape[RESTARTS]
            x, w = np.pad(x, ((0, pad), (0, 0))), np.pad(w, (0, pad))
            x, w = jax.device_put(x, lane_sharding(mesh)), jax.device_put(w, lane_sharding(mesh))
        mean, scatter = _batch_moments(jnp.asarray(x, jnp.float32), jnp.asarray(w))
        m = Moments(int(w.sum()), np.asarray(mean, np.float64), np.asarray(scatter, np.float64))
        total = m if total is None else merge(total, m)
    if total is None:
        raise InputError("no rows to compute statistics from")
    return total


def covariance(m: Moments) -> np.ndarray:
    """Unbiased sample covariance [D, D]."""
    return m.scatter / max(m.count - 1, 1)


def ledoit_wolf_shrinkage(m: Moments, rows: Iterable[np.ndarray]) -> float:
    """Ledoit and Wolf's (2004) optimal shrinkage of the covariance towards mu * I, mu = trace / D; `rows`
    is a second pass over the same rows as `m` (the fourth moment needs their mean)."""
    n, d = m.count, len(m.mean)
    s = m.scatter / n                                   # the biased estimate, as in the paper
    fourth = sum(float(_fourth_moment(jnp.asarray(x, jnp.float32), jnp.asarray(m.mean, jnp.float32)))
                 for x in rows)
    mu = np.trace(s) / d
    delta = (np.sum(s * s) - 2 * mu * np.trace(s) + d * mu * mu) / d
    beta = min((fourth / n - np.sum(s * s)) / (d * n), delta)
    return float(beta / delta) if delta > 0 else 0.0


def shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """(1 - shrinkage) cov + shrinkage * (trace / D) I."""
    d = len(cov)
    return (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)


def whitening(cov: np.ndarray, rcond: float = 1e-5) -> np.ndarray:
    """W [D, K] with W^T cov W = I over the K directions whose variance exceeds rcond x the largest
    (PCA whitening; directions with no variance are dropped, not inverted)."""
    values, vectors = np.linalg.eigh(cov)
    keep = values > rcond * max(values.max(), 0.0)
    if not keep.any():
        raise InputError("the trusted activations have no variance (every row is the same)")
    return vectors[:, keep] / np.sqrt(values[keep])


def trimmed_moments(x_nd: np.ndarray, *, fraction: float, rounds: int = 6, alpha: float = 4.0,
                    shrinkage: float = 0.01, batch: int = 4096, start: np.ndarray | None = None,
                    mesh=None) -> Moments:
    """A robust mean and covariance for rows that may hold a cluster of outliers (SPECTRE's filter): fit
    on the kept rows, whiten every row by that fit, score each by quantum entropy (the directions in which
    all rows have more variance than the kept ones weigh exponentially more), keep the 1 - `fraction`
    lowest, refit; `rounds` times. The first fit is on the rows `start` (default: all)."""
    keep = np.arange(len(x_nd)) if start is None else start
    for _ in range(rounds):
        m = moments(batches(x_nd[keep], batch), mesh)
        z = (x_nd - m.mean) @ whitening(shrunk(covariance(m), shrinkage))
        values, vectors = np.linalg.eigh(covariance(moments(batches(z, batch), mesh)))
        weights = np.exp(alpha * (values / values.max() - 1.0))
        score = np.sum(np.square(z @ vectors) * weights, axis=1)
        keep = np.argsort(score)[: max(int(round(len(x_nd) * (1.0 - fraction))), z.shape[1] + 2)]
    # reweighting (as after a minimum-covariance-determinant fit): the trimmed fit is too narrow, so take
    # back every row within 1.5 x the 97.5% quantile of the kept rows' Mahalanobis distances (a heuristic
    # margin: the kept rows lack the clean tail, so their own quantile understates the clean spread)
    m = moments(batches(x_nd[keep], batch), mesh)
    dist = np.sum(np.square((x_nd - m.mean) @ whitening(shrunk(covariance(m), shrinkage))), axis=1)
    keep = dist <= np.quantile(dist[keep], 0.975) * 1.5
    return moments(batches(x_nd[keep], batch), mesh)
