"""Activation detectors, one layer at a time: each is a pair of pure functions, `fit(trusted, untrusted,
labels) -> state` (a NamedTuple of arrays) and `score(state, x [N, D]) -> [N]` (higher: more anomalous,
jitted). Statistics come from `stats` (float64 merges); scores are computed in float32 under jit.

- mahalanobis: squared Mahalanobis distance from the trusted mean / shrunk covariance, over D.
- que: quantum-entropy scoring (Dong, Hopkins and Li 2019): whiten by the trusted covariance; Q =
  exp(alpha * C / ||C||) for the covariance C of the whitened untrusted rows (cupbearer takes C from the raw
  rows); score z^T Q z / tr(Q). Directions in which the untrusted data has excess variance weigh
  exponentially more.
- spectral: spectral signatures (Tran, Li and Madry 2018): the squared projection on the top principal
  direction of the untrusted rows, in the trusted rows' whitened coordinates (raw without trusted rows).
- spectre: after SPECTRE (Hayase et al. 2021): a robust mean and covariance trimmed from the trusted and
  untrusted rows together (`stats.trimmed_moments`), whitening by it, then QUE.
- probe: the supervised skyline: logistic regression on standardised activations, given anomaly labels.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrisk.anomaly import stats
from jaxrisk.errors import InputError


class Whitened(NamedTuple):
    mean: jax.Array          # [D]
    whiten: jax.Array        # [D, K] (x - mean) @ whiten has identity covariance on the reference rows


class Que(NamedTuple):
    mean: jax.Array          # [D]
    whiten: jax.Array        # [D, K]
    q: jax.Array             # [K, K] exp(alpha C / ||C||) / its trace


class Direction(NamedTuple):
    mean: jax.Array          # [D]
    direction: jax.Array     # [D] unit vector


class Probe(NamedTuple):
    mean: jax.Array          # [D]
    scale: jax.Array         # [D]
    w: jax.Array             # [D]
    b: jax.Array             # []


class Detector(NamedTuple):
    fit: Callable            # (trusted [N, D] | None, untrusted [M, D] | None, labels [M] | None, settings) -> state
    score: Callable          # (state, x [N, D]) -> [N]
    uses_trusted: bool
    uses_untrusted: bool
    uses_labels: bool


class Settings(NamedTuple):
    shrinkage: float | None = None   # None: Ledoit-Wolf
    alpha: float = 4.0               # QUE's exponent
    trim: float = 0.3                # SPECTRE: bound on the contaminated fraction of the pooled rows
    batch: int = 4096                # rows per streamed batch
    probe_steps: int = 300
    mesh: object = None              # a device mesh the statistics' rows are sharded over (None: one device)


def _gaussian(x_nd: np.ndarray, settings: Settings) -> Whitened:
    m = stats.moments(stats.batches(x_nd, settings.batch), settings.mesh)
    shrinkage = settings.shrinkage
    if shrinkage is None:
        shrinkage = stats.ledoit_wolf_shrinkage(m, stats.batches(x_nd, settings.batch))
    w = stats.whitening(stats.shrunk(stats.covariance(m), shrinkage))
    return Whitened(jnp.asarray(m.mean, jnp.float32), jnp.asarray(w, jnp.float32))


def _que_matrix(z_nk: np.ndarray, settings: Settings) -> jax.Array:
    """exp(alpha C / ||C||) / trace for the covariance C of the whitened untrusted rows; with no more rows
    than dimensions C says nothing, and Q = I / K (the Mahalanobis distance, up to scale)."""
    n, k = z_nk.shape
    if n <= k:
        return jnp.eye(k, dtype=jnp.float32) / k
    c = stats.covariance(stats.moments(stats.batches(z_nk, settings.batch), settings.mesh))
    values, vectors = np.linalg.eigh(c)
    weights = np.exp(settings.alpha * (values / values.max() - 1.0))   # exp(alpha C / ||C||) x exp(-alpha)
    q = (vectors * weights) @ vectors.T
    return jnp.asarray(q / np.trace(q), jnp.float32)


def _whiten(state, x_nd):
    return (jnp.asarray(x_nd, jnp.float32) - state.mean) @ state.whiten


def _whitened_rows(state, x_nd: np.ndarray, settings: Settings) -> np.ndarray:
    """All rows of `x_nd` in `state`'s whitened coordinates, computed batch by batch."""
    return np.concatenate([np.asarray(_whiten(state, x)) for x in stats.batches(x_nd, settings.batch)])


def fit_mahalanobis(trusted, untrusted, labels, settings: Settings) -> Whitened:
    return _gaussian(trusted, settings)


@jax.jit
def score_mahalanobis(state: Whitened, x_nd) -> jax.Array:
    return jnp.sum(jnp.square(_whiten(state, x_nd)), axis=1) / state.mean.shape[0]


def fit_que(trusted, untrusted, labels, settings: Settings) -> Que:
    g = _gaussian(trusted, settings)
    z = _whitened_rows(g, untrusted, settings)
    return Que(g.mean, g.whiten, _que_matrix(z, settings))


@jax.jit
def score_que(state: Que, x_nd) -> jax.Array:
    z = _whiten(state, x_nd)
    return jnp.einsum("nk,kl,nl->n", z, state.q, z)


def fit_spectral(trusted, untrusted, labels, settings: Settings) -> Direction:
    """The top principal direction of the untrusted rows, in the trusted rows' whitened coordinates and
    centred on their mean (raw, an untrusted-only fit sees the classes' own spread first; whitened, the
    excess variance a planted cluster adds); without trusted rows, Tran et al.'s raw form."""
    if trusted is None:
        m = stats.moments(stats.batches(untrusted, settings.batch), settings.mesh)
        _, vectors = np.linalg.eigh(stats.covariance(m))
        return Direction(jnp.asarray(m.mean, jnp.float32), jnp.asarray(vectors[:, -1], jnp.float32))
    g = _gaussian(trusted, settings)
    z = _whitened_rows(g, untrusted, settings)
    whitened = stats.moments(stats.batches(z, settings.batch), settings.mesh)
    _, vectors = np.linalg.eigh(stats.covariance(whitened))
    return Direction(g.mean, g.whiten @ jnp.asarray(vectors[:, -1], jnp.float32))


@jax.jit
def score_spectral(state: Direction, x_nd) -> jax.Array:
    return jnp.square((jnp.asarray(x_nd, jnp.float32) - state.mean) @ state.direction)


def fit_spectre(trusted, untrusted, labels, settings: Settings) -> Que:
    """QUE against a robust reference: the trimmed estimate over the trusted and untrusted rows together,
    starting from the trusted rows (so a trusted set that is itself a little contaminated, or none at all,
    still gives a clean reference); `settings.trim` bounds the contaminated fraction of the pool."""
    pooled = untrusted if trusted is None else np.concatenate([trusted, untrusted])
    start = None if trusted is None else np.arange(len(trusted))
    m = stats.trimmed_moments(pooled, fraction=settings.trim, alpha=settings.alpha, batch=settings.batch,
                              start=start, mesh=settings.mesh)
    shrinkage = 0.01 if settings.shrinkage is None else settings.shrinkage
    g = Whitened(jnp.asarray(m.mean, jnp.float32),
                 jnp.asarray(stats.whitening(stats.shrunk(stats.covariance(m), shrinkage)), jnp.float32))
    z = _whitened_rows(g, untrusted, settings)
    return Que(g.mean, g.whiten, _que_matrix(z, settings))


def fit_probe(trusted, untrusted, labels, settings: Settings) -> Probe:
    """Logistic regression (Adam, full batch, a little weight decay) on the labelled rows `untrusted`."""
    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        raise InputError("the probe needs labelled inputs of both kinds (anomalous and not)")
    x = jnp.asarray(untrusted, jnp.float32)
    mean, scale = jnp.mean(x, 0), jnp.std(x, 0) + 1e-6
    z, y = (x - mean) / scale, jnp.asarray(labels, jnp.float32)
    pos = jnp.mean(y)
    weight = jnp.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))        # balanced classes

    def loss(wb):
        logits = z @ wb["w"] + wb["b"]
        return jnp.mean(weight * optax.sigmoid_binary_cross_entropy(logits, y)) + 1e-4 * jnp.sum(wb["w"] ** 2)

    opt = optax.adam(0.05)

    @jax.jit
    def train(wb):
        def step(carry, _):
            wb, state = carry
            updates, state = opt.update(jax.grad(loss)(wb), state, wb)
            return (optax.apply_updates(wb, updates), state), None
        return jax.lax.scan(step, (wb, opt.init(wb)), None, length=settings.probe_steps)[0][0]

    wb = train({"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())})
    return Probe(mean, scale, wb["w"], wb["b"])


@jax.jit
def score_probe(state: Probe, x_nd) -> jax.Array:
    return ((jnp.asarray(x_nd, jnp.float32) - state.mean) / state.scale) @ state.w + state.b


DETECTORS: dict[str, Detector] = {
    "mahalanobis": Detector(fit_mahalanobis, score_mahalanobis, True, False, False),
    "que": Detector(fit_que, score_que, True, True, False),
    "spectral": Detector(fit_spectral, score_spectral, True, True, False),
    "spectre": Detector(fit_spectre, score_que, True, True, False),
    "probe": Detector(fit_probe, score_probe, False, True, True),
}
