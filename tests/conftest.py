"""Test setup: 8 simulated CPU devices (multi-device paths), and the shared real assets."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the demo cache of a test session lives in a temporary directory, never in the user's home
os.environ["JAXRISK_CACHE"] = __import__("tempfile").mkdtemp(prefix="jaxrisk-test-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("JAXRISK_ASSETS", ROOT.parent / "shared" / "assets"))
MNIST_DIR = ASSETS / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (set JAXRISK_ASSETS or clone beside ../shared/assets)")
    return MNIST_DIR


STORIES_DIR = ASSETS / "models" / "tinyllamas-stories260K"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES_DIR / "model.safetensors").exists():
        pytest.skip(f"pretrained stories260K not found at {STORIES_DIR} (set JAXRISK_ASSETS or clone beside "
                    "../shared/assets)")
    return STORIES_DIR
