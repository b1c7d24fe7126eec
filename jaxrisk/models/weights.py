"""Torch-free weight import/export in PyTorch state-dict layout (safetensors).

A scanner of untrusted models must never execute them, so pickle checkpoints
(`.pt`, `.pth`, `.bin`, `.ckpt`) are refused: unpickling runs code chosen by
whoever wrote the file.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrisk.errors import InputError
from jaxrisk.io import atomic_write
from jaxrisk.models.classifiers import build
from jaxrisk.models.safetensors_file import WEIGHT_DTYPES, check_finite, open_safetensors


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a validated safetensors file, copied out of the memory map (classifiers are small)."""
    return {name: np.array(array) for name, array in open_safetensors(path).items()}


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


def torch_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every PyTorch state-dict key of the model and the NNX variable that holds it: `NAME.weight` /
    `NAME.bias` for each of `torch_layers`, unless the model lists its own (`torch_state`, e.g. batch norm)."""
    if hasattr(model, "torch_state"):
        return model.torch_state()
    out = {}
    for name in model.torch_layers:
        layer = getattr(model, name)
        out[f"{name}.weight"], out[f"{name}.bias"] = layer.kernel, layer.bias
    return out


def _batch_norm_counters(keys) -> list[str]:
    """PyTorch's `num_batches_tracked` key beside each batch norm's running mean."""
    return [k.removesuffix(".running_mean") + ".num_batches_tracked" for k in keys if k.endswith(".running_mean")]


def torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters under PyTorch keys and layouts (`fc1.weight` is [out, in]); batch norm layers
    also get PyTorch's `num_batches_tracked` (0), which its strict loading asks for."""
    out = {key: np.ascontiguousarray(_to_torch(np.asarray(var.get_value())))
           for key, var in torch_variables(model).items()}
    for key in _batch_norm_counters(list(out)):
        out[key] = np.zeros((), np.int64)
    return out


def load_torch_state_dict(model: nnx.Module, state: dict[str, np.ndarray], source: str) -> nnx.Module:
    """Copy a PyTorch-layout state dict into `model`; every key problem is listed in one error. Batch norm's
    `num_batches_tracked` counters are accepted and ignored (evaluation uses the running statistics)."""
    variables = torch_variables(model)
    expected = {key: _torch_shape(np.asarray(var.get_value())) for key, var in variables.items()}
    counters = set(_batch_norm_counters(expected))
    state = {k: v for k, v in state.items() if k not in counters}
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
        elif state[key].dtype not in WEIGHT_DTYPES:
            problems.append(f"{key} has dtype {state[key].dtype}, expected float32, float64, float16 or bfloat16")
    if problems:
        raise InputError(f"{source}: weights do not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    for key in sorted(expected):
        check_finite(source, key, state[key])
    for key, var in variables.items():
        var.set_value(jnp.asarray(_from_torch(state[key]), jnp.float32))
    return model


def load_classifier(path: str | Path, arch: str, input_shape: tuple[int, int, int] | None = None) -> nnx.Module:
    """Build `arch` and load PyTorch-layout safetensors weights into it.

    For `mlp` the layer widths are read from the file; `input_shape` (C, H, W)
    defaults to a square single-channel image of `fc1`'s input width.
    """
    state = read_safetensors(path)
    kwargs = {}
    if arch == "mlp":
        layers = sorted({k.split(".")[0] for k in state if k.startswith("fc") and k.split(".")[0][2:].isdecimal()},
                        key=lambda s: int(s[2:]))
        kernels = [state[f"{name}.weight"] for name in layers if f"{name}.weight" in state]
        if "fc1.weight" not in state or len(layers) < 2 or any(w.ndim != 2 for w in kernels):
            found = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(state.items()))
            raise InputError(f"{path}: an mlp needs 2-D keys fc1.weight ... fcN.weight (N >= 2); found {found}")
        widths = [int(w.shape[0]) for w in kernels]
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


