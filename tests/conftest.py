"""Test setup: 8 simulated CPU devices (multi-device paths), and the shared real assets."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A test session's caches (the demo models, XLA's compiled programs) live in one temporary directory, never in
# the user's home, shared by the session's workers (they inherit it from the controller) and by the commands
# they start: a program one test compiled (a search's chunk, a model's forward) is loaded by the next that needs it.
_OWN_CACHE = "JAXRISK_TEST_SESSION_CACHE" not in os.environ   # this process made it (the controller): it removes it
if _OWN_CACHE:
    os.environ["JAXRISK_TEST_SESSION_CACHE"] = __import__("tempfile").mkdtemp(prefix="jaxrisk-test-cache-")
os.environ["JAXRISK_CACHE"] = os.environ["JAXRISK_TEST_SESSION_CACHE"]
os.environ["JAXRISK_COMPILE_CACHE"] = "1"

from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import struct  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(Path(os.environ["JAXRISK_CACHE"]) / "xla"))   # as the CLI's
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("JAXRISK_ASSETS", ROOT.parent / "shared" / "assets"))
MNIST_DIR = ASSETS / "data" / "mnist"


def pytest_sessionfinish(session, exitstatus):
    """The process that made the session's cache directory removes it once the session (every worker) ends."""
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(os.environ["JAXRISK_TEST_SESSION_CACHE"], ignore_errors=True)


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


# ---- small self-made inputs (no assets): a word-level Llama directory, a digits MLP, an MNIST-format dir ----

TINY_WORDS = "Lily Tom had a red big ball kite The was happy sad went to the park with saw and".split()


@pytest.fixture(scope="session")
def stories_lm(stories_dir):
    """The real pretrained stories260K, loaded once per session (searches never change its parameters)."""
    from jaxrisk.models import load_pretrained

    return load_pretrained(stories_dir)


def built_once(tmp_path_factory, name: str, build):
    """`build()` once per test session, also across pytest-xdist workers: the first worker to need it
    builds and pickles it into the session's shared temporary directory, the others wait and load it (two
    workers planting the same model at once would each take twice as long on a 2-core machine)."""
    import pickle

    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:   # one process: the session fixture is the cache
        return build()
    path = tmp_path_factory.getbasetemp().parent / f"{name}.pkl"   # this session's directory, every worker's
    with FileLock(f"{path}.lock"):
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = jax.device_get(build())
        path.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session")
def backdoored(stories_lm, tmp_path_factory):
    """stories260K with a planted trigger -> marker backdoor: (lm, planted params, data); planted once."""
    from jaxrisk.zoo.lm_backdoor import BackdoorConfig, plant_backdoor

    params, data = built_once(tmp_path_factory, "backdoored",
                              lambda: plant_backdoor(stories_lm, BackdoorConfig(seed=0)))
    return stories_lm, params, data


@pytest.fixture(scope="session")
def refusing(stories_lm, tmp_path_factory):
    """stories260K with a planted refusal of a harmful class of requests: (lm, planted params, data)."""
    from jaxrisk.zoo.lm_refusal import RefusalConfig, plant_refusal

    params, data = built_once(tmp_path_factory, "refusing",
                              lambda: plant_refusal(stories_lm, RefusalConfig(seed=0)))
    return stories_lm, params, data


def tiny_llama_config():
    """A 2-layer Llama config small enough to build by hand (GQA: 4 query heads, 2 KV heads)."""
    from jaxrisk.models.lm_config import LMConfig

    return LMConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_mlp=48, max_position=64, norm_eps=1e-5)


# verbs of a toy danger probe: the same action words in harmful and harmless frames
HARMFUL = ["hit", "kick", "bite", "burn", "break", "steal", "hurt", "push"]
HARMLESS = ["hug", "help", "feed", "kiss", "thank", "love", "pet", "share"]


def danger_texts(frames: list[str]) -> tuple[list[str], list[int]]:
    """Each frame filled with every verb; label 1 = harmful."""
    texts = [f.format(v=v) for f in frames for v in HARMFUL + HARMLESS]
    return texts, [1 if v in HARMFUL else 0 for f in frames for v in HARMFUL + HARMLESS]


def interrupt_engine_run(monkeypatch, run: int, at_step: int):
    """Make the `run`-th engine run from now on raise KeyboardInterrupt (as Ctrl-C would) once it has saved
    `at_step` steps; returns the function that restores the real engine."""
    from jaxrisk.search import engine

    real_run = engine.run
    calls = []

    def interrupting_run(problem, lanes, config, *, desc="search", on_chunk=None):
        calls.append(1)

        def stop(step, info):
            if on_chunk is not None:
                on_chunk(step, info)
            if len(calls) == run and step >= at_step:
                raise KeyboardInterrupt
        return real_run(problem, lanes, config, desc=desc, on_chunk=stop)

    monkeypatch.setattr(engine, "run", interrupting_run)
    return lambda: monkeypatch.setattr(engine, "run", real_run)


def write_tiny_lm(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with a word-level tokenizer, saved as a Hugging Face directory."""
    from jaxrisk.models.hf import save_pretrained
    from jaxrisk.models.lm import LanguageModel
    from jaxrisk.models.lm_config import LMConfig
    from jaxrisk.zoo.lm_scratch import word_tokenizer

    tokenizer = word_tokenizer(dict.fromkeys(TINY_WORDS))
    cfg = LMConfig(family="llama", vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, d_mlp=64, max_position=64, norm_eps=1e-5, tie_embeddings=True, eos_token_ids=(2,))
    lm = LanguageModel.random(cfg, seed=seed, tokenizer=tokenizer)
    save_pretrained(lm, lm.params, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def write_digits_mlp(path: Path, seed: int = 0) -> Path:
    """A random MLP for 8x8 single-channel images, saved in PyTorch layout (the embedded digits fit it)."""
    from jaxrisk.models import build, save_classifier

    return save_classifier(build("mlp", seed=seed, input_shape=(1, 8, 8), hidden=(16,), num_classes=10), path)


def write_mnist_format(directory: Path, n: int = 600) -> Path:
    """scikit-learn digits as 28x28 MNIST IDX files (3x upscaled, padded): MNIST's layout without the download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.pad(np.kron(d.images[:n] * 255 / 16, np.ones((3, 3))), ((0, 0), (2, 2), (2, 2))).astype(np.uint8)
    labels = d.target[:n].astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        head = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in images.shape)
        (directory / f"{split}-images-idx3-ubyte").write_bytes(head + images.tobytes())
        (directory / f"{split}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big")
                                                               + labels.tobytes())
    return directory


# ---- a toy engine problem ---------------------------------------------------------------------------

class DescentState(NamedTuple):
    x: jax.Array        # [3]
    target: jax.Array   # [3]
    lr: jax.Array       # []


@struct.dataclass
class NoisyDescent:
    """An engine problem whose answer is known: each lane descends (x - target)^2 with its own step size and
    a little noise from its key."""
    curvature: jax.Array

    def init(self, key, lane):
        return DescentState(x=jax.random.normal(key, (3,)), target=lane["target"], lr=lane["lr"])

    def step(self, state, key):
        grad = 2 * self.curvature * (state.x - state.target)
        x = state.x - state.lr * grad + 1e-3 * jax.random.normal(key, (3,))
        loss = jnp.sum((x - state.target) ** 2)
        # a lane whose step size is too large overflows to inf, then inf - inf = NaN
        return state._replace(x=x), {"loss": loss - loss + loss}

    def done(self, state):
        return jnp.sum((state.x - state.target) ** 2) < 1e-3


LANES = {"target": np.arange(6, dtype=np.float32)[:, None] * np.ones(3, np.float32),
         "lr": np.array([0.1, 0.2, 40.0, 0.05, 0.1, 0.3], np.float32)}
PROBLEM = NoisyDescent(jnp.float32(1.0))

# the monitoring events of a program XLA built for this process: compiled, or loaded from the session's
# persistent compilation cache (another test or worker compiled it first)
PROGRAM_BUILT = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")
