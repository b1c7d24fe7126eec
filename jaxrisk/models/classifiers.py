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


def _digits_shape(arch: str, input_shape) -> tuple[int, int, int]:
    """The fixed input of the 28x28 digit architectures, or a clear error."""
    if tuple(input_shape) != (1, 28, 28):
        raise InputError(f"{arch} takes 1x28x28 images, not {'x'.join(map(str, input_shape))}")
    return (1, 28, 28)


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
        self.input_shape = _digits_shape("mnist_cnn", input_shape)
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
        self.input_shape = _digits_shape("lenet5", input_shape)
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


def _conv(x_bhwc: jax.Array, conv: nnx.Conv, stride: int = 1, padding: int = 0) -> jax.Array:
    """A bias-free or biased convolution with PyTorch's stride and zero padding (XLA's native op)."""
    y = jax.lax.conv_general_dilated(x_bhwc, conv.kernel[...], (stride, stride), [(padding, padding)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if conv.bias is None else y + conv.bias[...]


class BatchNorm(nnx.Module):
    """PyTorch's BatchNorm2d (eps 1e-5), named by its state-dict prefix (`layer2.0.bn1`): evaluation uses the
    running statistics; training (`stats` a dict) normalises by the batch's own and records them there, under
    that name, for `calibrate_batch_norm`."""

    def __init__(self, channels: int, name: str):
        self.name = name
        self.weight = nnx.Param(jnp.ones(channels))
        self.bias = nnx.Param(jnp.zeros(channels))
        self.running_mean = nnx.BatchStat(jnp.zeros(channels))
        self.running_var = nnx.BatchStat(jnp.ones(channels))

    def torch_state(self) -> dict[str, nnx.Variable]:
        return {f"{self.name}.{k}": getattr(self, k) for k in ("weight", "bias", "running_mean", "running_var")}

    def __call__(self, x_bhwc: jax.Array, stats: dict | None) -> jax.Array:
        if stats is None:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            mean, var = x_bhwc.mean((0, 1, 2)), x_bhwc.var((0, 1, 2))
            stats[self.name] = (mean, var)
        return (x_bhwc - mean) * jax.lax.rsqrt(var + 1e-5) * self.weight[...] + self.bias[...]


class ResNet8(nnx.Module):
    """A small ResNet for 28x28 digits in torchvision's layout (BasicBlocks, batch norm, no conv biases):

    conv1 16 3x3 -> bn1 -> ReLU -> layer1 (16) -> layer2 (32, stride 2) -> layer3 (64, stride 2) ->
    global average pool -> fc 10. A block: conv1 3x3 (its stride) -> bn1 -> ReLU -> conv2 3x3 -> bn2, plus
    the input (through `downsample`: conv 1x1 + bn, where the shape changes), then ReLU. Keys as torchvision:
    `layer2.0.conv1.weight`, `layer2.0.downsample.1.running_mean`, ... Training (a `dropout_key` given)
    normalises by batch statistics; evaluation by the running ones.
    """

    widths = (16, 32, 64)
    tap_names = ("conv1", "layer1", "layer2", "layer3", "fc")   # the stem conv (before bn), what each PyTorch
                                                                # block returns (after its ReLU), the logits

    def __init__(self, *, input_shape=(1, 28, 28), num_classes: int = 10, rngs: nnx.Rngs):
        self.input_shape = _digits_shape("resnet8", input_shape)

        def conv(c_in, c_out, k):
            return nnx.Conv(c_in, c_out, (k, k), use_bias=False, rngs=rngs)

        self.conv1, self.bn1 = conv(1, 16, 3), BatchNorm(16, "bn1")
        self.blocks = nnx.List()
        c_in = 16
        for i, c_out in enumerate(self.widths):
            p = f"layer{i + 1}.0"
            block = nnx.Dict(conv1=conv(c_in, c_out, 3), bn1=BatchNorm(c_out, f"{p}.bn1"),
                             conv2=conv(c_out, c_out, 3), bn2=BatchNorm(c_out, f"{p}.bn2"))
            if c_out != c_in:
                block["down_conv"], block["down_bn"] = conv(c_in, c_out, 1), BatchNorm(c_out, f"{p}.downsample.1")
            self.blocks.append(block)
            c_in = c_out
        self.fc = nnx.Linear(c_in, num_classes, rngs=rngs)

    def batch_norms(self) -> dict[str, BatchNorm]:
        """Each batch norm by its name (its state-dict prefix, the key of its batch statistics)."""
        norms = [self.bn1] + [block[k] for block in self.blocks for k in ("bn1", "bn2", "down_bn") if k in block]
        return {norm.name: norm for norm in norms}

    def torch_state(self) -> dict[str, nnx.Variable]:
        """PyTorch key -> NNX variable (weights.torch_variables)."""
        out = {"conv1.weight": self.conv1.kernel, "fc.weight": self.fc.kernel, "fc.bias": self.fc.bias}
        for i, block in enumerate(self.blocks):
            p = f"layer{i + 1}.0"
            out.update({f"{p}.conv1.weight": block["conv1"].kernel, f"{p}.conv2.weight": block["conv2"].kernel})
            if "down_conv" in block:
                out[f"{p}.downsample.0.weight"] = block["down_conv"].kernel
        for norm in self.batch_norms().values():
            out.update(norm.torch_state())
        return out

    def __call__(self, x_bchw: jax.Array, *, dropout_key: jax.Array | None = None,
                 taps: dict | None = None, stats: dict | None = None) -> jax.Array:
        """Logits [B, classes]; `taps` as for MnistCNN."""
        taps = {} if taps is None else taps
        stats = {} if dropout_key is not None and stats is None else stats
        x = jnp.transpose(x_bchw, (0, 2, 3, 1))
        x = jax.nn.relu(self.bn1(_tap(taps, "conv1", _conv(x, self.conv1, padding=1)), stats))
        for i, block in enumerate(self.blocks):
            stride = 1 if i == 0 else 2
            h = jax.nn.relu(block["bn1"](_conv(x, block["conv1"], stride, 1), stats))
            h = block["bn2"](_conv(h, block["conv2"], 1, 1), stats)
            if "down_conv" in block:
                x = block["down_bn"](_conv(x, block["down_conv"], stride), stats)
            x = _tap(taps, f"layer{i + 1}", jax.nn.relu(h + x))
        return _tap(taps, "fc", self.fc(x.mean((1, 2))))


def calibrate_batch_norm(model: nnx.Module, images: np.ndarray, batch: int = 1000) -> nnx.Module:
    """Set every batch norm's running statistics to the mean over batches of `images` of the batch statistics
    training normalises by (PyTorch keeps a momentum average of the same; its variance is the unbiased one,
    a factor n / (n - 1) with n = batch x height x width, negligible here); a model without batch norm is
    returned as it is."""
    if not hasattr(model, "batch_norms"):
        return model
    graphdef, state = nnx.split(model)

    @jax.jit
    def batch_stats(state, x):
        stats = {}
        nnx.merge(graphdef, state)(x, stats=stats)
        return stats

    chunks = [batch_stats(state, jnp.asarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    for name, norm in model.batch_norms().items():
        norm.running_mean.set_value(jnp.mean(jnp.stack([c[name][0] for c in chunks]), 0))
        norm.running_var.set_value(jnp.mean(jnp.stack([c[name][1] for c in chunks]), 0))
    return model


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
    "resnet8": Arch("resnet8", ResNet8, (1, 28, 28)),
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
