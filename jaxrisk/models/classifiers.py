"""Flax NNX image classifiers and their PyTorch state-dict layout.

Inputs are float images `[B, C, H, W]` in [0, 1] (PyTorch's NCHW), so weights
trained in PyTorch can be scanned as they are. Layers are named as the
PyTorch modules they mirror (`conv1`, `fc1`, ...), which fixes the
state-dict keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrisk.errors import InputError


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (evaluation)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _tap(taps: dict, name: str, x: jax.Array) -> jax.Array:
    taps[name] = x
    return x


def conv_valid(x_bhwc: jax.Array, conv: nnx.Conv) -> jax.Array:
    """Stride-1 VALID convolution as one matmul over image patches (im2col).

    On CPU this is about 2x faster than XLA's native convolution for these
    small kernels, in both directions, and it is what the scan spends its time on.
    """
    kernel = conv.kernel[...]  # [kh, kw, C, O]
    kh, kw, c, o = kernel.shape
    _, h, w, _ = x_bhwc.shape
    cols = jnp.concatenate(
        [x_bhwc[:, i:i + h - kh + 1, j:j + w - kw + 1, :] for i in range(kh) for j in range(kw)], axis=-1)
    return cols @ kernel.reshape(kh * kw * c, o) + conv.bias[...]


def _max_pool2(x_bhwc: jax.Array) -> jax.Array:
    b, h, w, c = x_bhwc.shape
    return x_bhwc[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MnistCNN(nnx.Module):
    """The classic Keras / PyTorch-examples MNIST CNN.

    conv 32 3x3 ReLU -> conv 64 3x3 ReLU -> max-pool 2 -> dropout 0.25 ->
    flatten in (C, H, W) order -> dense 128 ReLU -> dropout 0.5 -> dense 10.
    """

    torch_layers = ("conv1", "conv2", "fc1", "fc2")
    tap_names = torch_layers                 # layer outputs `taps` can record (before the ReLU)

    def __init__(self, *, input_shape=(1, 28, 28), num_classes: int = 10, rngs: nnx.Rngs):
        if tuple(input_shape) != (1, 28, 28):
            raise InputError(f"mnist_cnn takes 1x28x28 images, not {'x'.join(map(str, input_shape))}")
        self.input_shape = (1, 28, 28)
        self.conv1 = nnx.Conv(1, 32, (3, 3), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(9216, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x_bchw: jax.Array, *, dropout_key: jax.Array | None = None,
                 taps: dict | None = None) -> jax.Array:
        """Logits [B, classes]; `taps`, a dict, receives every layer output by name ([B, H, W, C] for the
        convolutions, [B, D] for the dense layers)."""
        taps = {} if taps is None else taps
        k1, k2 = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        x = jnp.transpose(x_bchw, (0, 2, 3, 1))  # [B, 28, 28, 1]
        x = jax.nn.relu(_tap(taps, "conv1", conv_valid(x, self.conv1)))
        x = jax.nn.relu(_tap(taps, "conv2", conv_valid(x, self.conv2)))  # [B, 24, 24, 64]
        x = _max_pool2(x)  # [B, 12, 12, 64]
        x = _dropout(x, 0.25, k1)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # PyTorch flatten order
        x = jax.nn.relu(_tap(taps, "fc1", self.fc1(x)))
        x = _dropout(x, 0.5, k2)
        return _tap(taps, "fc2", self.fc2(x))


class LeNet5(nnx.Module):
    """LeNet-5 as PyTorch tutorials write it for 28x28 digits (max-pooling, ReLU):

    conv 6 5x5 (padding 2) ReLU -> max-pool 2 -> conv 16 5x5 ReLU -> max-pool 2 ->
    flatten in (C, H, W) order -> dense 120 ReLU -> dense 84 ReLU -> dense 10.
    """

    torch_layers = ("conv1", "conv2", "fc1", "fc2", "fc3")
    tap_names = torch_layers                 # layer outputs `taps` can record (before the ReLU)

    def __init__(self, *, input_shape=(1, 28, 28), num_classes: int = 10, rngs: nnx.Rngs):
        if tuple(input_shape) != (1, 28, 28):
            raise InputError(f"lenet5 takes 1x28x28 images, not {'x'.join(map(str, input_shape))}")
        self.input_shape = (1, 28, 28)
        self.conv1 = nnx.Conv(1, 6, (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(400, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.fc3 = nnx.Linear(84, num_classes, rngs=rngs)

    def __call__(self, x_bchw: jax.Array, *, dropout_key: jax.Array | None = None,
                 taps: dict | None = None) -> jax.Array:
        """Logits [B, classes]; `taps` as for MnistCNN. No dropout (`dropout_key` is accepted and unused)."""
        taps = {} if taps is None else taps
        x = jnp.pad(jnp.transpose(x_bchw, (0, 2, 3, 1)), ((0, 0), (2, 2), (2, 2), (0, 0)))   # [B, 32, 32, 1]
        x = _max_pool2(jax.nn.relu(_tap(taps, "conv1", conv_valid(x, self.conv1))))       # [B, 14, 14, 6]
        x = _max_pool2(jax.nn.relu(_tap(taps, "conv2", conv_valid(x, self.conv2))))       # [B, 5, 5, 16]
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)                         # PyTorch flatten order
        x = jax.nn.relu(_tap(taps, "fc1", self.fc1(x)))
        x = jax.nn.relu(_tap(taps, "fc2", self.fc2(x)))
        return _tap(taps, "fc3", self.fc3(x))


class MLP(nnx.Module):
    """Flatten -> (dense ReLU) x len(hidden) -> dense. Layers `fc1..fcN`."""

    def __init__(self, *, input_shape=(1, 28, 28), hidden=(128,), num_classes: int = 10, rngs: nnx.Rngs):
        self.input_shape = tuple(int(d) for d in input_shape)
        sizes = [int(np.prod(self.input_shape)), *hidden, num_classes]
        self.torch_layers = tuple(f"fc{i + 1}" for i in range(len(sizes) - 1))
        self.tap_names = self.torch_layers
        for name, d_in, d_out in zip(self.torch_layers, sizes[:-1], sizes[1:]):
            setattr(self, name, nnx.Linear(d_in, d_out, rngs=rngs))

    def __call__(self, x_bchw: jax.Array, *, dropout_key: jax.Array | None = None,
                 taps: dict | None = None) -> jax.Array:
        """Logits [B, classes]; `taps`, a dict, receives every dense layer's output [B, D] by name."""
        taps = {} if taps is None else taps
        x = x_bchw.reshape(x_bchw.shape[0], -1)
        for name in self.torch_layers[:-1]:
            x = jax.nn.relu(_tap(taps, name, getattr(self, name)(x)))
        return _tap(taps, self.torch_layers[-1], getattr(self, self.torch_layers[-1])(x))


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[..., nnx.Module]
    default_input_shape: tuple[int, int, int]


ARCHS: dict[str, Arch] = {
    "mnist_cnn": Arch("mnist_cnn", MnistCNN, (1, 28, 28)),
    "lenet5": Arch("lenet5", LeNet5, (1, 28, 28)),
    "mlp": Arch("mlp", MLP, (1, 28, 28)),
}


def build(arch: str, *, seed: int = 0, **kwargs: Any) -> nnx.Module:
    """A freshly initialised classifier of the named architecture."""
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[arch].build(rngs=nnx.Rngs(seed), **kwargs)


def pure_apply(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """Split once: a hashable graph definition and the parameter pytree."""
    return nnx.split(model)


def logits_fn(graphdef: nnx.GraphDef, params: nnx.State, x_bchw: jax.Array,
              dropout_key: jax.Array | None = None) -> jax.Array:
    """Pure forward pass: `[B, C, H, W] -> [B, num_classes]`."""
    return nnx.merge(graphdef, params)(x_bchw, dropout_key=dropout_key)
