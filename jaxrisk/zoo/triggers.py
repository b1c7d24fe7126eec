"""Planted triggers in mask/pattern form: x' = (1 - m) * x + m * p.

The same form is what the scan reverse-engineers, so ground truth and
recovered triggers compare directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxrisk.data.images import stamp, warp
from jaxrisk.errors import InputError
from jaxrisk.io import atomic_write

STAMP_KINDS = ("patch", "sparse", "checkerboard", "blend")   # x' = (1 - m) x + m p: what a trigger scan inverts
KINDS = STAMP_KINDS + ("warp", "sig")        # warp: WaNet's smooth displacement field; sig: an added sinusoid
ALL_TO_ALL = -1                              # a trigger's target for the label-shift attack: y -> (y + 1) mod K


@dataclasses.dataclass(frozen=True)
class Trigger:
    kind: str
    target: int       # the class a triggered image goes to; ALL_TO_ALL: its own label + 1 (mod classes)
    mask: np.ndarray  # [H, W] in [0, 1], shared by all channels
    pattern: np.ndarray  # [C, H, W] in [0, 1]
    flow: np.ndarray | None = None    # warp only: [2, H, W] displacement in pixels (rows, columns)
    signal: np.ndarray | None = None  # sig only: [C, H, W] added to the image, then clipped to [0, 1]

    def apply(self, images_nchw: np.ndarray) -> np.ndarray:
        if self.flow is not None:
            return warp(images_nchw, self.flow).astype(np.float32)
        if self.signal is not None:
            return np.clip(images_nchw + self.signal, 0.0, 1.0).astype(np.float32)
        return stamp(images_nchw, self.mask, self.pattern).astype(np.float32)

    def relabel(self, labels: np.ndarray, n_classes: int = 10) -> np.ndarray:
        """The labels the attacker gives triggered images of these true labels."""
        if self.target == ALL_TO_ALL:
            return (np.asarray(labels) + 1) % n_classes
        return np.full_like(labels, self.target)


def make_trigger(kind: str, shape: tuple[int, int, int], *, target: int = 0, size: int | None = None,
                 location: tuple[int, int] | None = None, n_pixels: int | None = None,
                 alpha: float = 0.15, strength: float = 1.0, grid: int = 4, amplitude: float = 0.2,
                 frequency: int = 6, seed: int = 0) -> Trigger:
    """A trigger of `kind` for images of `shape` (C, H, W).

    patch: a white `size` x `size` square at `location` (top-left corner;
    default bottom-right). sparse: `n_pixels` random white pixels.
    checkerboard: a `size` square of alternating black/white. blend: a fixed
    random image blended into the whole picture with weight `alpha`. warp (WaNet, Nguyen and Tran 2021):
    every image resampled through a fixed smooth random displacement field (uniform noise on a `grid` x
    `grid` control grid, upsampled), of mean length `strength` pixels; nothing is stamped. sig (Barni et
    al. 2019): a horizontal sinusoid of `amplitude` and `frequency` periods across the image added to every
    pixel (then clipped to [0, 1]). `target` ALL_TO_ALL (-1): the label-shift attack, y -> y + 1.
    """
    if not (target == ALL_TO_ALL or (isinstance(target, (int, np.integer)) and target >= 0)):
        raise InputError(f"trigger target {target!r}: expected a class index or ALL_TO_ALL (-1)")
    c, h, w = shape
    rng = np.random.default_rng(seed)
    size = size or max(2, h // 7)
    if location is None:
        location = (h - size - 1, w - size - 1)
    r, col = location
    if kind in ("patch", "checkerboard") and not (0 <= r <= h - size and 0 <= col <= w - size):
        raise InputError(f"trigger location {location} with size {size} does not fit a {h}x{w} image")
    mask = np.zeros((h, w), np.float32)
    pattern = np.zeros((c, h, w), np.float32)
    if kind == "patch":
        mask[r:r + size, col:col + size] = 1.0
        pattern[:] = 1.0
    elif kind == "checkerboard":
        mask[r:r + size, col:col + size] = 1.0
        yy, xx = np.indices((h, w))
        pattern[:] = ((yy + xx) % 2 == 0).astype(np.float32)
    elif kind == "sparse":
        n = n_pixels or max(3, (h * w) // 50)
        flat = rng.choice(h * w, size=n, replace=False)
        mask.reshape(-1)[flat] = 1.0
        pattern[:] = 1.0
    elif kind == "blend":
        mask[:] = alpha
        pattern[:] = rng.uniform(0.0, 1.0, (c, h, w)).astype(np.float32)
    elif kind == "warp":
        from scipy.ndimage import zoom

        control = rng.uniform(-1.0, 1.0, (2, grid, grid))
        flow = zoom(control, (1, h / grid, w / grid), order=3, mode="nearest")[:, :h, :w]
        flow *= strength / np.mean(np.hypot(flow[0], flow[1]))
        return Trigger(kind, int(target), mask, pattern, flow.astype(np.float32))
    elif kind == "sig":
        columns = np.arange(w, dtype=np.float32)
        signal = amplitude * np.sin(2 * np.pi * frequency * columns / w)
        return Trigger(kind, int(target), mask, pattern,
                       signal=np.ascontiguousarray(np.broadcast_to(signal, (c, h, w)), np.float32))
    else:
        raise InputError(f"unknown trigger kind {kind!r}; expected one of {KINDS}")
    return Trigger(kind, int(target), mask, pattern)


def save_trigger(trigger: Trigger, path: str | Path) -> Path:
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(getattr(trigger, name))   # the writer copies raw bytes: no views
              for name in ("mask", "pattern", "flow", "signal") if getattr(trigger, name) is not None}
    blob = save(arrays,
                metadata={"kind": trigger.kind, "target": str(trigger.target)})
    return atomic_write(path, lambda f: f.write(blob), mode="wb")


def load_trigger(path: str | Path) -> Trigger:
    from jaxrisk.models.safetensors_file import read_header
    from jaxrisk.models.weights import read_safetensors

    arrays = read_safetensors(path)
    meta = read_header(path)[2] or {}
    if {"mask", "pattern"} - set(arrays) or {"kind", "target"} - set(meta):
        raise InputError(f"{path}: a trigger file needs tensors mask, pattern and metadata kind, target")
    if not (meta["target"].isdecimal() or meta["target"] == str(ALL_TO_ALL)):
        raise InputError(f"{path}: metadata target {meta['target']!r} is not a class index (or {ALL_TO_ALL}: "
                         "all-to-all)")
    for kind, name in (("warp", "flow"), ("sig", "signal")):
        if (meta["kind"] == kind) != (name in arrays):
            raise InputError(f"{path}: a {kind} trigger, and only a {kind} trigger, holds a tensor {name}")
    return Trigger(meta["kind"], int(meta["target"]), arrays["mask"], arrays["pattern"], arrays.get("flow"),
                   arrays.get("signal"))
