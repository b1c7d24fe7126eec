"""Dataset readers: IDX parsing, clear errors, the embedded default."""

import gzip

import numpy as np
import pytest

from jaxrisk.data import load_digits, load_mnist, read_idx
from jaxrisk.errors import InputError


def _write_idx(path, array, magic_type=0x08, compress=False):
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(blob)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_layout_read_from_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress=compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress=compress)
    data = load_mnist(tmp_path, "test")
    assert data.images.shape == (7, 1, 28, 28) and data.images.dtype == np.float32
    np.testing.assert_allclose(data.images[:, 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, labels)


def test_missing_mnist_file_is_named(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28)))
    with pytest.raises(InputError, match="no MNIST file t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path, "test")


def test_bad_idx_magic(tmp_path):
    (tmp_path / "x").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(InputError, match="not an IDX file"):
        read_idx(tmp_path / "x")


def test_truncated_idx(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((3, 4, 4)))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-5])
    with pytest.raises(InputError, match=r"header says \[3, 4, 4\]"):
        read_idx(tmp_path / "x")


def test_label_count_must_match(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(InputError, match="2 labels for 3 images"):
        load_mnist(tmp_path, "test")


def test_not_a_directory(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        load_mnist(tmp_path / "missing")


def test_digits_default_is_embedded_and_split():
    train, test = load_digits("train"), load_digits("test")
    assert train.shape == test.shape == (1, 16, 16)
    assert len(train.labels) + len(test.labels) == 1797
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    small = load_digits("test", size=8)
    np.testing.assert_array_equal(test.images[:, :, ::2, ::2], small.images)  # 16x16 repeats each pixel 2x2
    with pytest.raises(InputError, match="multiple of 8"):
        load_digits(size=12)


def test_real_mnist(mnist_dir):
    data = load_mnist(mnist_dir, "test")
    assert data.images.shape == (10000, 1, 28, 28)
    assert np.bincount(data.labels).tolist()[:3] == [980, 1135, 1032]
