"""Activations of many layers in one forward pass per batch, as [N, D] float32 feature rows per layer.

Classifiers: by layer name (`model.tap_names`: the layer's output before its nonlinearity). A convolution's
[B, H, W, C] output becomes its per-channel spatial mean and max [B, 2C] (a covariance over H x W x C
features is out of reach, and a small patch trigger shows in the max). Language models: by TransformerLens
hook name, [B, T, D] reduced over the valid positions of each row (`mean`) or taken at its last one (`last`).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrisk.errors import InputError
from jaxrisk.models.lm import forward


def check_names(names, valid: list[str], what: str) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise InputError(f"{what}: unknown layer name(s) {unknown or '(none given)'}; valid: {', '.join(valid)}")
    return names


def _features(x: jax.Array) -> jax.Array:
    if x.ndim == 4:                                       # [B, H, W, C]
        return jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
    return x.reshape(x.shape[0], -1)


@partial(jax.jit, static_argnames=("graphdef", "names"))
def _classifier_batch(graphdef, params, images_bchw, names):
    taps = {}
    nnx.merge(graphdef, params)(images_bchw, taps=taps)
    return {n: _features(taps[n]).astype(jnp.float32) for n in names}


def classifier_activations(graphdef, params, images_bchw: np.ndarray, names, *, batch: int = 1000,
                           progress=None) -> dict[str, np.ndarray]:
    """{layer name: [N, D]} for images [N, C, H, W] in [0, 1]."""
    valid = list(nnx.merge(graphdef, params).tap_names)
    names = check_names(names, valid, "classifier activations")
    out = {n: [] for n in names}
    for i in range(0, len(images_bchw), batch):
        acts = _classifier_batch(graphdef, params, jnp.asarray(images_bchw[i:i + batch], jnp.float32), names)
        for n in names:
            out[n].append(np.asarray(acts[n]))
        if progress is not None:
            progress(min(i + batch, len(images_bchw)))
    return {n: np.concatenate(v) for n, v in out.items()}


@partial(jax.jit, static_argnames=("graphdef", "names", "reduce"))
def _lm_batch(graphdef, params, tokens_bt, valid_bt, names, reduce):
    _, _, acts = forward(graphdef, params, tokens_bt, valid_bt=valid_bt, capture=names, logits=False)
    w = valid_bt.astype(jnp.float32)
    if reduce == "last":
        last = jnp.maximum(jnp.sum(valid_bt, axis=1) - 1, 0)
        return {n: acts[n][jnp.arange(tokens_bt.shape[0]), last].astype(jnp.float32) for n in names}
    return {n: (jnp.einsum("bt,btd->bd", w, acts[n].astype(jnp.float32)) / jnp.sum(w, 1, keepdims=True))
            for n in names}


def lm_activations(lm, tokens_bt: np.ndarray, valid_bt: np.ndarray, names, *,
                   reduce: Literal["mean", "last"] = "mean", batch: int = 64, progress=None) -> dict[str, np.ndarray]:
    """{hook name: [N, D]} for right-padded token rows [N, T] (`valid_bt` marks the real tokens)."""
    valid = [n for n in lm.hook_names() if "pattern" not in n and "scores" not in n and "attn.hook_" not in n]
    names = check_names(names, valid, "language-model activations")
    out = {n: [] for n in names}
    for i in range(0, len(tokens_bt), batch):
        acts = _lm_batch(lm.graphdef, lm.params, jnp.asarray(tokens_bt[i:i + batch]),
                         jnp.asarray(valid_bt[i:i + batch]), names, reduce)
        for n in names:
            out[n].append(np.asarray(acts[n]))
        if progress is not None:
            progress(min(i + batch, len(tokens_bt)))
    return {n: np.concatenate(v) for n, v in out.items()}
