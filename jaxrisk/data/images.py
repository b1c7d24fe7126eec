"""Image datasets: MNIST from IDX files, scikit-learn's bundled 8x8 digits.

Every reader returns `ImageSet`s of float32 images `[N, C, H, W]` in [0, 1]
and int32 labels `[N]`.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from jaxrisk.data.text import regular_file
from jaxrisk.errors import InputError


@dataclasses.dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # [N, C, H, W] float32 in [0, 1]
    labels: np.ndarray  # [N] int32
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def take(self, n: int) -> "ImageSet":
        return ImageSet(self.images[:n], self.labels[:n], self.source)


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise InputError(f"{directory}: no MNIST file {stem} (or {stem}.gz); expected the four IDX files "
                     f"{', '.join(s for pair in _MNIST_FILES.values() for s in pair)}")


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into a uint8 array."""
    path = regular_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 0000080x)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise InputError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise InputError(f"{path}: header says {dims} ({math.prod(dims)} bytes), file holds {body.size}")
    return body.reshape(dims)


def load_mnist(directory: str | Path, split: str = "test") -> ImageSet:
    """MNIST `split` ('train' or 'test') from a directory of the IDX files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory (expected the four MNIST IDX files)")
    img_path, lab_path = (_find(directory, s) for s in _MNIST_FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3:
        raise InputError(f"{img_path}: expected images [N, H, W], found shape {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise InputError(f"{lab_path}: {len(labels)} labels for {len(images)} images in {img_path}")
    return ImageSet((images[:, None] / 255.0).astype(np.float32), labels.astype(np.int32), str(img_path))


def load_digits(split: str = "test", size: int = 16, seed: int = 0) -> ImageSet:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download); 2/3 train, 1/3 test.

    `size` (a multiple of 8) upscales by pixel repetition. The default, 16,
    makes a 2x2 trigger small next to a digit's strokes, as on MNIST.
    """
    from sklearn.datasets import load_digits as sk_digits

    if size % 8 or size < 8:
        raise InputError(f"digits size must be a multiple of 8, not {size}")
    d = sk_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    cut = (2 * len(order)) // 3
    idx = order[:cut] if split == "train" else order[cut:]
    f = size // 8
    images = np.repeat(np.repeat(d.images[idx, None] / 16.0, f, axis=2), f, axis=3).astype(np.float32)
    return ImageSet(images, d.target[idx].astype(np.int32), f"sklearn digits {size}x{size} ({split})")


def stamp(images_bchw, mask_hw, pattern_chw):
    """Apply a trigger: x' = (1 - m) * x + m * p (numpy or jax arrays; broadcasts over the batch)."""
    return (1.0 - mask_hw) * images_bchw + mask_hw * pattern_chw


def warp(images_bchw: np.ndarray, flow_2hw: np.ndarray) -> np.ndarray:
    """Resample every image at (row + flow[0], column + flow[1]), bilinear, clamped at the border."""
    _, _, h, w = images_bchw.shape
    rows = np.clip(np.arange(h)[:, None] + flow_2hw[0], 0, h - 1)
    cols = np.clip(np.arange(w)[None, :] + flow_2hw[1], 0, w - 1)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = rows - r0, cols - c0
    x = images_bchw
    return ((1 - fr) * (1 - fc) * x[..., r0, c0] + (1 - fr) * fc * x[..., r0, c1]
            + fr * (1 - fc) * x[..., r1, c0] + fr * fc * x[..., r1, c1])
