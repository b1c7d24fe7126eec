"""Inputs of `jaxrisk detect`: image arrays (safetensors / npz `images` [N, C, H, W] in [0, 1], optional
`labels`), text rows (JSONL `text`, optional `label`), and their activations, cached on disk by content so
that every detector run on the same model and data reads them instead of running the model again."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from jaxrisk.anomaly.run import Activations
from jaxrisk.data.batch import pad_batch
from jaxrisk.data.text import jsonl_rows, regular_file, text_field
from jaxrisk.errors import InputError
from jaxrisk.evals.activations import classifier_activations, lm_activations
from jaxrisk.io import atomic_write
from jaxrisk.models.safetensors_file import open_safetensors
from jaxrisk.search.fingerprint import fingerprint


def _labels(path, value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    value = np.asarray(value)
    if value.shape != (n,) or not (value.dtype == bool or np.issubdtype(value.dtype, np.integer)) \
            or not np.isin(value, (0, 1)).all():
        raise InputError(f"{path}: field 'labels' must be [{n}] booleans or 0/1 (1 = anomalous), "
                         f"got {value.dtype} {list(value.shape)}")
    return value.astype(bool)


def read_images(path: str | Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """(images [N, C, H, W] float32 in [0, 1], anomaly labels [N] bool or None) from .safetensors or .npz."""
    path = regular_file(path, "a .safetensors or .npz file with an `images` array")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise InputError(f"{path}: not a readable .npz file ({e})") from None
    elif path.suffix == ".safetensors":
        arrays = {k: np.array(v) for k, v in open_safetensors(path).items()}
    else:
        raise InputError(f"{path}: expected a .safetensors or .npz file, got {path.suffix or 'no suffix'}")
    if "images" not in arrays:
        raise InputError(f"{path}: no field 'images' (found: {', '.join(sorted(arrays)) or 'nothing'})")
    images = arrays["images"]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise InputError(f"{path}: field 'images' must be [N, {', '.join(map(str, shape))}], "
                         f"got {list(images.shape)}")
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"{path}: field 'images' must be float in [0, 1], got {images.dtype}")
    images = images.astype(np.float32)
    if len(images) == 0:
        raise InputError(f"{path}: field 'images' holds no images")
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise InputError(f"{path}: field 'images' must be float in [0, 1], got values in "
                         f"[{np.nanmin(images):g}, {np.nanmax(images):g}]" + ("" if np.isfinite(images).all()
                                                                            else " and non-finite values"))
    return images, _labels(path, arrays.get("labels"), len(images))


def read_texts(path: str | Path, what: str) -> tuple[list[str], np.ndarray | None]:
    """(texts, anomaly labels or None) from JSONL rows `{"text": ..., "label": 0 | 1 | bool}`."""
    rows = jsonl_rows(path, "a `text` field")
    if not rows:
        raise InputError(f"{path}: no rows; the {what} file needs JSONL rows with a `text` field")
    texts, labels = [], []
    for line, row in rows:
        if "text" not in row:
            raise InputError(f"{path}:{line}: no field 'text' (found: {', '.join(sorted(row)) or 'nothing'})")
        text = text_field(Path(path), line, row, "text")
        if not text.strip():
            raise InputError(f"{path}:{line}: field 'text' is empty")
        texts.append(text)
        label = row.get("label")
        if label is not None and label not in (0, 1):
            raise InputError(f"{path}:{line}: field 'label' must be 0, 1, true or false, got {label!r}")
        labels.append(label)
    given = [x is not None for x in labels]
    if any(given) and not all(given):
        raise InputError(f"{path}:{rows[given.index(False)][0]}: no field 'label' while other rows have one")
    return texts, (np.asarray(labels, bool) if all(given) else None)


def cached(cache_dir: str | Path | None, key, compute) -> dict[str, np.ndarray]:
    """`compute()` ({name: array}), read from / written to CACHE/KEY.npz when `cache_dir` is given (`key()`
    names the entry: hashing the inputs costs time, so it is only done for a cache)."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key()}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            pass                      # a damaged cache entry is recomputed
    arrays = compute()
    atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")
    return arrays


def classifier_task(graphdef, params, trusted: np.ndarray, inputs: np.ndarray, *, layers, labels=None,
                    untrusted: np.ndarray | None = None, cache_dir=None, batch: int = 1000,
                    source: dict | None = None) -> Activations:
    """Activations of an image classifier on trusted images, inputs and (optionally) untrusted images."""
    layers = tuple(layers)

    def acts(images):
        return cached(cache_dir, lambda: "cls-" + fingerprint(params, images, layers),
                      lambda: classifier_activations(graphdef, params, images, layers, batch=batch))

    return Activations(trusted=acts(trusted), inputs=acts(inputs),
                       untrusted=None if untrusted is None else acts(untrusted), labels=labels,
                       source=source or {})


def lm_task(lm, trusted: list[str], inputs: list[str], *, layers, reduce: str = "mean", labels=None,
            untrusted: list[str] | None = None, cache_dir=None, batch: int = 64, max_length: int | None = None,
            source: dict | None = None) -> Activations:
    """Activations of a language model on trusted texts, inputs and (optionally) untrusted texts."""
    layers = tuple(layers)
    limit = max_length or lm.cfg.max_position

    def acts(texts):
        ids = [lm.encode(t)[:limit] for t in texts]
        tokens, valid = pad_batch(ids)
        return cached(cache_dir, lambda: "lm-" + fingerprint(lm.params, tokens, valid, layers, reduce),
                      lambda: lm_activations(lm, tokens, valid, layers, reduce=reduce, batch=batch))

    return Activations(trusted=acts(trusted), inputs=acts(inputs),
                       untrusted=None if untrusted is None else acts(untrusted), labels=labels,
                       source=source or {})
