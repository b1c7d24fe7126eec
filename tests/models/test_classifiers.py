"""Classifier ports: PyTorch parity of the layout, and refusal of bad weight files."""

import pickle
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxrisk.errors import InputError
from jaxrisk.models import build, load_classifier, logits_fn, pure_apply, save_classifier, torch_state_dict

torch = pytest.importorskip("torch", reason="torch (CPU) is the parity reference; install the [test] extra")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from neural_cleanse_torch import TorchMnistCNN  # noqa: E402  the PyTorch-examples CNN, the layout we must read


def _torch_weights(tmp_path, module):
    torch.manual_seed(0)
    net = module()
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().numpy() for k, v in net.state_dict().items()}, str(path))
    return net, path


def test_mnist_cnn_matches_pytorch_logits(tmp_path):
    net, path = _torch_weights(tmp_path, TorchMnistCNN)
    x = np.random.default_rng(0).uniform(0, 1, (16, 1, 28, 28)).astype(np.float32)
    graphdef, params = pure_apply(load_classifier(path, "mnist_cnn"))
    ours = np.asarray(logits_fn(graphdef, params, jnp.asarray(x)))
    ref = net(torch.from_numpy(x)).detach().numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_mlp_matches_pytorch_and_infers_its_widths(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.fc1, net.fc2, net.fc3 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 10)
    path = tmp_path / "mlp.safetensors"
    save_file({k: v.detach().numpy() for k, v in net.state_dict().items()}, str(path))
    model = load_classifier(path, "mlp")
    assert model.input_shape == (1, 8, 8)
    x = np.random.default_rng(1).uniform(0, 1, (5, 1, 8, 8)).astype(np.float32)
    ref = net.fc3(torch.relu(net.fc2(torch.relu(net.fc1(torch.from_numpy(x).reshape(5, -1)))))).detach().numpy()
    ours = np.asarray(logits_fn(*pure_apply(model), jnp.asarray(x)))
    assert np.abs(ours - ref).max() <= 1e-5


def test_save_then_load_round_trips(tmp_path):
    model = build("mnist_cnn", seed=3)
    save_classifier(model, tmp_path / "m.safetensors")
    again = load_classifier(tmp_path / "m.safetensors", "mnist_cnn")
    for k, v in torch_state_dict(model).items():
        np.testing.assert_array_equal(v, torch_state_dict(again)[k])


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.safetensors: no such file"):
        load_classifier(tmp_path / "nope.safetensors", "mnist_cnn")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not weights, just some text that is long enough")
    with pytest.raises(InputError, match="notes.safetensors: not a safetensors file"):
        load_classifier(path, "mnist_cnn")


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_checkpoint_is_refused_without_being_executed(tmp_path, writer):
    path = tmp_path / "model.pt"
    marker = tmp_path / "executed"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    if writer == "torch.save":
        torch.save({"conv1.weight": torch.zeros(1), "evil": Payload()}, path)
    else:
        path.write_bytes(pickle.dumps({"evil": Payload()}))
    with pytest.raises(InputError, match="pickle checkpoint, which jaxrisk refuses to load: unpickling executes"):
        load_classifier(path, "mnist_cnn")
    assert not marker.exists()


def test_every_key_problem_is_listed_at_once(tmp_path):
    state = torch_state_dict(build("mnist_cnn"))
    del state["conv2.bias"]
    state["fc1.weight"] = state["fc1.weight"][:, :100]
    state["extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InputError) as err:
        load_classifier(tmp_path / "bad.safetensors", "mnist_cnn")
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "missing keys: conv2.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "fc1.weight has shape [128, 100], expected [128, 9216]" in msg


def test_unknown_arch():
    with pytest.raises(InputError, match="unknown architecture 'resnet'"):
        build("resnet")


class TorchLeNet5(torch.nn.Module):
    """LeNet-5 as PyTorch tutorials write it for 28x28 digits: the layout `lenet5` reads."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(400, 120), torch.nn.Linear(120, 84), torch.nn.Linear(84, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


@pytest.mark.slow
def test_lenet5_matches_pytorch_logits_and_layers(tmp_path):
    net, path = _torch_weights(tmp_path, TorchLeNet5)
    x = np.random.default_rng(1).uniform(0, 1, (16, 1, 28, 28)).astype(np.float32)
    model = load_classifier(path, "lenet5")
    taps = {}
    ours = np.asarray(model(jnp.asarray(x), taps=taps))
    ref = net(torch.from_numpy(x)).detach().numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    conv2 = net.conv2(torch.nn.functional.max_pool2d(torch.relu(net.conv1(torch.from_numpy(x))), 2))
    np.testing.assert_allclose(np.asarray(taps["conv2"]), conv2.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4)
    for k, v in torch_state_dict(model).items():
        np.testing.assert_array_equal(v, net.state_dict()[k].numpy())


class TorchBlock(torch.nn.Module):
    """torchvision's BasicBlock."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                                  torch.nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(h + (x if self.downsample is None else self.downsample(x)))


class TorchResNet8(torch.nn.Module):
    """The layout `resnet8` reads: torchvision's names, one BasicBlock per stage."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 16, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(16)
        self.layer1 = torch.nn.Sequential(TorchBlock(16, 16, 1))
        self.layer2 = torch.nn.Sequential(TorchBlock(16, 32, 2))
        self.layer3 = torch.nn.Sequential(TorchBlock(32, 64, 2))
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.slow
def test_resnet8_matches_pytorch_in_evaluation_and_exports_a_strict_state_dict(tmp_path):
    torch.manual_seed(0)
    net = TorchResNet8()
    with torch.no_grad():   # running statistics unlike the initial ones, so evaluation mode is what is compared
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(7)
    net.eval()
    path = tmp_path / "resnet8.safetensors"
    save_file({k: v.detach().numpy() for k, v in net.state_dict().items()}, str(path))
    model = load_classifier(path, "resnet8")
    x = np.random.default_rng(2).uniform(0, 1, (8, 1, 28, 28)).astype(np.float32)
    taps = {}
    ours = np.asarray(model(jnp.asarray(x), taps=taps))
    ref = net(torch.from_numpy(x)).detach().numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    np.testing.assert_allclose(np.asarray(taps["layer1"]).transpose(0, 3, 1, 2),
                               net.layer1(torch.relu(net.bn1(net.conv1(torch.from_numpy(x))))).detach().numpy(),
                               atol=1e-4)
    again = TorchResNet8()
    again.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in torch_state_dict(model).items()}, strict=True)
    assert np.abs(again.eval()(torch.from_numpy(x)).detach().numpy() - ref).max() <= 1e-4


def test_resnet8_training_mode_uses_batch_statistics_and_calibration_sets_them():
    from jaxrisk.models.classifiers import calibrate_batch_norm

    model = build("resnet8", seed=0)
    x = np.random.default_rng(3).uniform(0, 1, (64, 1, 28, 28)).astype(np.float32)
    graphdef, params = pure_apply(model)
    train = np.asarray(logits_fn(graphdef, params, jnp.asarray(x), jax.random.key(0)))
    before = np.asarray(logits_fn(graphdef, params, jnp.asarray(x)))
    assert np.abs(train - before).max() > 1e-2          # initial running statistics (0, 1) are not the batch's
    calibrate_batch_norm(model, x, batch=64)            # one batch: the running statistics become exactly its own
    graphdef, params = pure_apply(model)
    np.testing.assert_allclose(np.asarray(logits_fn(graphdef, params, jnp.asarray(x))), train, atol=1e-4)
