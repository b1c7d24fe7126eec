"""Torch-free weight import/export in PyTorch state-dict layout (safetensors).

A scanner of untrusted models must never execute them, so pickle checkpoints
(`.pt`, `.pth`, `.bin`, `.ckpt`) are refused: unpickling runs code chosen by
whoever wrote the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrisk.errors import InputError
from jaxrisk.io import atomic_write
from jaxrisk.models.classifiers import build

_PICKLE_HINT = (
    "it looks like a PyTorch pickle checkpoint, which jaxrisk refuses to load: unpickling executes "
    "code chosen by the file's author. Convert it where you trust it, e.g. "
    "`from safetensors.torch import save_file; save_file(torch.load(p, weights_only=True), 'model.safetensors')`"
)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file as numpy, with a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a .safetensors file")
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = f.read(header_len) if 0 < header_len <= 100_000_000 else b""
    try:  # a safetensors header length may itself start with byte 0x80, so sniff pickles only on failure
        meta = json.loads(header)
        assert isinstance(meta, dict)
    except (ValueError, AssertionError):
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise InputError(f"{path}: {_PICKLE_HINT}") from None
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (only {len(head)} bytes)") from None
        raise InputError(f"{path}: not a safetensors file (its header is not a JSON table of tensors)") from None
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as e:  # truncated or inconsistent file
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def _torch_shape(param: np.ndarray) -> tuple[int, ...]:
    """PyTorch shape of an NNX kernel: Linear [I,O] -> [O,I]; Conv [kh,kw,I,O] -> [O,I,kh,kw]."""
    if param.ndim == 2:
        return param.shape[::-1]
    if param.ndim == 4:
        kh, kw, i, o = param.shape
        return (o, i, kh, kw)
    return param.shape


def _to_torch(kernel: np.ndarray) -> np.ndarray:
    if kernel.ndim == 2:
        return kernel.T
    if kernel.ndim == 4:
        return kernel.transpose(3, 2, 0, 1)
    return kernel


def _from_torch(weight: np.ndarray) -> np.ndarray:
    if weight.ndim == 2:
        return weight.T
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    return weight


def torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters under PyTorch keys and layouts (`fc1.weight` is [out, in])."""
    out = {}
    for name in model.torch_layers:
        layer = getattr(model, name)
        out[f"{name}.weight"] = np.ascontiguousarray(_to_torch(np.asarray(layer.kernel.get_value())))
        out[f"{name}.bias"] = np.asarray(layer.bias.get_value())
    return out


def load_torch_state_dict(model: nnx.Module, state: dict[str, np.ndarray], source: str) -> nnx.Module:
    """Copy a PyTorch-layout state dict into `model`; every key problem is listed in one error."""
    expected = {}
    for name in model.torch_layers:
        layer = getattr(model, name)
        expected[f"{name}.weight"] = _torch_shape(np.asarray(layer.kernel.get_value()))
        expected[f"{name}.bias"] = tuple(layer.bias.get_value().shape)
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    for key in sorted(set(expected) & set(state)):
        if tuple(state[key].shape) != expected[key]:
            problems.append(f"{key} has shape {list(state[key].shape)}, expected {list(expected[key])}")
        elif not np.issubdtype(state[key].dtype, np.floating):
            problems.append(f"{key} has dtype {state[key].dtype}, expected a float dtype")
    if problems:
        raise InputError(f"{source}: weights do not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    for name in model.torch_layers:
        layer = getattr(model, name)
        layer.kernel.set_value(jnp.asarray(_from_torch(state[f"{name}.weight"]), jnp.float32))
        layer.bias.set_value(jnp.asarray(state[f"{name}.bias"], jnp.float32))
    return model


def load_classifier(path: str | Path, arch: str, input_shape: tuple[int, int, int] | None = None) -> nnx.Module:
    """Build `arch` and load PyTorch-layout safetensors weights into it.

    For `mlp` the layer widths are read from the file; `input_shape` (C, H, W)
    defaults to a square single-channel image of `fc1`'s input width.
    """
    state = read_safetensors(path)
    kwargs = {}
    if arch == "mlp":
        layers = sorted({k.split(".")[0] for k in state if k.startswith("fc")}, key=lambda s: int(s[2:] or 0))
        if "fc1.weight" not in state or len(layers) < 2:
            raise InputError(f"{path}: an mlp needs keys fc1.weight ... fcN.weight (N >= 2); found {sorted(state)}")
        widths = [int(state[f"{name}.weight"].shape[0]) for name in layers if f"{name}.weight" in state]
        n_in = int(state["fc1.weight"].shape[-1])
        if input_shape is None:
            side = int(round(n_in ** 0.5))
            if side * side != n_in:
                raise InputError(f"{path}: fc1.weight takes {n_in} inputs, not a square single-channel image")
            input_shape = (1, side, side)
        if int(np.prod(input_shape)) != n_in:
            raise InputError(
                f"{path}: fc1.weight takes {n_in} inputs but the images are {'x'.join(map(str, input_shape))}")
        kwargs = dict(input_shape=input_shape, hidden=tuple(widths[:-1]), num_classes=widths[-1])
    elif input_shape is not None:
        kwargs = dict(input_shape=input_shape)
    model = build(arch, **kwargs)
    return load_torch_state_dict(model, state, str(path))


def save_classifier(model: nnx.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's PyTorch-layout state dict as safetensors, atomically."""
    from safetensors.numpy import save

    blob = save(torch_state_dict(model), metadata=metadata)
    return atomic_write(path, lambda f: f.write(blob), mode="wb")


