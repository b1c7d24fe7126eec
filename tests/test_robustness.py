"""Bad input, faults and interruption: one clear error (or the right result) per case, never a traceback.

Each case asserts either an `InputError` whose one-line message names the file / field / flag and what was
expected (exit code 2 and no traceback from the command line), or the correct result. The classes follow the
audit: data loss, resume identity, non-finite models, malformed files, checks that survive `python -O`,
tracebacks, silently wrong results, hangs.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, write_digits_mlp, write_mnist_format

from jaxrisk.cli import main
from jaxrisk.errors import InputError


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `jaxrisk ARGS` in this process; argparse's own exits included."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def one_line(err: str) -> str:
    """The `jaxrisk: error:` line (or argparse's `error:` line) of stderr."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory) -> Path:
    return write_digits_mlp(tmp_path_factory.mktemp("mlp") / "model.safetensors")


@pytest.fixture(scope="module")
def behaviors_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("behaviors") / "b.jsonl"
    path.write_text('{"goal": "Lily had a", "target": "red ball"}\n')
    return path


# ---- 1. data loss: jaxrisk deletes only what it created -------------------------------------------

def test_scan_refuses_a_checkpoint_directory_holding_user_files(mlp_file, tmp_path, capsys):
    notes = tmp_path / "checkpoint" / "important.txt"
    notes.parent.mkdir()
    notes.write_text("notes")
    code, err = run_cli(["scan", "--weights", mlp_file, "--arch", "mlp", "--out", tmp_path, "--max-steps", 2,
                         "--restarts", 1, "--no-progress"], capsys)
    assert code == 2 and "holds files jaxrisk did not write" in one_line(err) and str(notes.parent) in err
    assert notes.read_text() == "notes"


def test_redteam_refuses_a_checkpoint_directory_holding_user_files(tiny_lm_dir, behaviors_file, tmp_path, capsys):
    notes = tmp_path / "checkpoint" / "important.txt"
    notes.parent.mkdir()
    notes.write_text("notes")
    code, err = run_cli(["redteam", "--model", tiny_lm_dir, "--behaviors", behaviors_file, "--out", tmp_path,
                         "--steps", 2, "--search-width", 8, "--topk", 4, "--suffix-len", 3, "--no-progress"], capsys)
    assert code == 2 and "did not write" in one_line(err) and notes.read_text() == "notes"


def _quadratic_problem():
    from conftest import LANES, PROBLEM

    return PROBLEM, {k: v[:2] for k, v in LANES.items()}


def test_engine_refuses_foreign_files_and_keeps_them(tmp_path):
    from jaxrisk.search import RunConfig, run

    problem, lanes = _quadratic_problem()
    (tmp_path / "mine.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=r"holds files jaxrisk did not write .*never deletes"):
        run(problem, lanes, RunConfig(max_steps=4, chunk_steps=2, progress=False, checkpoint_dir=str(tmp_path)))
    assert (tmp_path / "mine.bin").read_bytes() == b"x"


def test_cleanup_removes_only_what_the_engine_wrote(tmp_path):
    from jaxrisk.search import RunConfig, remove_checkpoint, run

    problem, lanes = _quadratic_problem()
    ckpt = tmp_path / "ckpt"
    run(problem, lanes, RunConfig(max_steps=4, chunk_steps=2, progress=False, checkpoint_dir=str(ckpt)))
    (ckpt / "added-later.txt").write_text("mine")
    remove_checkpoint(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["added-later.txt"]
    remove_checkpoint(tmp_path)            # no marker: nothing is touched
    assert (ckpt / "added-later.txt").exists()


def test_checkpoint_path_that_is_a_file_is_refused(tmp_path):
    from jaxrisk.search import RunConfig, run

    problem, lanes = _quadratic_problem()
    (tmp_path / "ckpt").write_text("a file")
    with pytest.raises(InputError, match="exists and is not a directory"):
        run(problem, lanes, RunConfig(max_steps=2, chunk_steps=1, progress=False,
                                            checkpoint_dir=str(tmp_path / "ckpt")))
    assert (tmp_path / "ckpt").read_text() == "a file"


def test_corrupt_checkpoint_marker_is_refused(tmp_path):
    from jaxrisk.search import RunConfig, run
    from jaxrisk.search.engine import MARKER

    problem, lanes = _quadratic_problem()
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(InputError, match=f"{MARKER}: not a JSON object .*checkpoint marker jaxrisk wrote"):
        run(problem, lanes, RunConfig(max_steps=2, chunk_steps=1, progress=False, checkpoint_dir=str(tmp_path)))


# ---- 2. a run's identity is the same in every process ---------------------------------------------

_FINGERPRINT_SCRIPT = """
from jaxrisk.models.classifiers import build, pure_apply
from jaxrisk.search.fingerprint import fingerprint
from jaxrisk.scan import TriggerInversion
import jax.numpy as jnp, numpy as np
g, p = pure_apply(build("mnist_cnn", seed=3))
problem = TriggerInversion(params=p, images=jnp.zeros((2, 1, 28, 28)), labels=jnp.zeros(2, jnp.int32), graphdef=g)
print(fingerprint(problem, {"target": np.arange(3)}))
"""


@pytest.mark.slow
def test_fingerprint_is_stable_across_processes_and_sees_static_config():
    from jaxrisk.models.classifiers import build, pure_apply
    from jaxrisk.search.fingerprint import fingerprint
    from jaxrisk.scan import InversionConfig, TriggerInversion

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    other = subprocess.run([sys.executable, "-c", _FINGERPRINT_SCRIPT], capture_output=True, text=True, env=env,
                           check=True).stdout.split()[-1]
    g, p = pure_apply(build("mnist_cnn", seed=3))
    problem = TriggerInversion(params=p, images=jnp.zeros((2, 1, 28, 28)), labels=jnp.zeros(2, jnp.int32), graphdef=g)
    here = fingerprint(problem, {"target": np.arange(3)})
    assert here == other
    changed_config = problem.replace(cfg=InversionConfig(learning_rate=0.2))
    changed_data = problem.replace(images=jnp.ones((2, 1, 28, 28)))
    assert len({here, fingerprint(changed_config, {"target": np.arange(3)}),
                fingerprint(changed_data, {"target": np.arange(3)})}) == 3
    a, b = 3, 4
    assert fingerprint(lambda: a) != fingerprint(lambda: b)          # closures by what they capture
    with pytest.raises(TypeError, match="no stable identity"):        # object arrays hash pointers
        fingerprint({"x": np.array(["s"], dtype=object)})


# ---- 3. non-finite models and values ---------------------------------------------------------------

def test_scan_refuses_nan_parameters_of_an_in_memory_model():
    from jaxrisk.data import load_digits
    from jaxrisk.models import build
    from jaxrisk.scan import ScanConfig, run
    from jaxrisk.search import RunConfig

    model = build("mlp", input_shape=(1, 8, 8), hidden=(16,), num_classes=10)
    model.fc1.kernel.set_value(model.fc1.kernel.get_value().at[0, 0].set(jnp.nan))
    with pytest.raises(InputError, match=r"parameter .*fc1.*kernel.* has 1 NaN / inf values"):
        run(model, load_digits("test", size=8), ScanConfig(run=RunConfig(max_steps=2, progress=False)))


def test_scan_cli_refuses_a_nan_weights_file(mlp_file, tmp_path, capsys):
    from jaxrisk.models.weights import read_safetensors
    from safetensors.numpy import save_file

    state = read_safetensors(mlp_file)
    state["fc2.bias"] = np.full_like(state["fc2.bias"], np.inf)
    save_file(state, str(tmp_path / "inf.safetensors"))
    code, err = run_cli(["scan", "--weights", tmp_path / "inf.safetensors", "--arch", "mlp", "--out", tmp_path / "o",
                         "--no-progress"], capsys)
    assert code == 2 and "fc2.bias" in one_line(err) and "inf.safetensors" in err


def test_reports_are_strict_json_with_null_and_a_reason(tmp_path):
    from jaxrisk.io import write_json

    write_json(tmp_path / "r.json", {"norm": float("nan"), "rows": [1.0, np.float32("inf")], "ok": np.int64(3)})
    text = (tmp_path / "r.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in report"))
    assert report["norm"] is None and report["rows"] == [1.0, None] and report["ok"] == 3
    assert report["not_finite"] == {"norm": "nan", "rows[1]": "inf"}


def test_generation_with_nan_weights_is_an_error_not_unk(tiny_lm_dir):
    from jaxrisk.models import load_pretrained

    lm = load_pretrained(tiny_lm_dir)
    lm.params = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), lm.params)
    with pytest.raises(InputError, match="logits are not finite .* at generation step 0"):
        lm.generate("Lily had a", 4)


# ---- 5. no `assert` on input anywhere in the package ------------------------------------------------

def test_the_package_has_no_assert_statements():
    offenders = []
    for path in sorted((ROOT / "jaxrisk").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"`assert` vanishes under python -O; raise InputError instead: {offenders}"


# ---- 6. tracebacks that must be clear errors --------------------------------------------------------

def test_non_utf8_behaviour_file_names_the_byte_offset(tmp_path):
    from jaxrisk.data.prompts import load_behaviors

    path = tmp_path / "b.csv"
    path.write_bytes(b"goal,target\nhello,w\xffrld\n")
    with pytest.raises(InputError, match=r"b.csv: not UTF-8 text \(byte 0xff at offset 19, line 2\)"):
        load_behaviors(path)


def test_non_utf8_circuit_data_names_the_byte_offset(tiny_lm_dir, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    code, err = run_cli(["circuits", "--model", tiny_lm_dir, "--data", path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "d.jsonl: not UTF-8 text (byte 0xe9 at offset 13, line 1)" in one_line(err)


@pytest.mark.parametrize("field, value, expected", [
    ("num_hidden_layers", "5", "field num_hidden_layers='5': expected a positive integer"),
    ("num_hidden_layers", 5.0, "field num_hidden_layers=5.0: expected a positive integer"),
    ("num_attention_heads", 0, "field num_attention_heads=0: expected a positive integer"),
    ("rms_norm_eps", "tiny", "norm_eps: expected a number, got 'tiny'"),
    ("rope_scaling", [1], "rope_parameters / rope_scaling must be JSON objects"),
    ("rope_theta", "abc", "field rope_theta='abc': expected a positive number"),
    ("rope_scaling", {"type": "linear", "factor": 0}, "rope field factor=0: expected a positive number"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                      "original_max_position_embeddings": 64}, "llama3 needs high_freq_factor > low_freq_factor"),
    ("layer_types", 3, "field layer_types=3: only all 'full_attention' is supported"),
])
def test_config_fields_of_the_wrong_type_are_named(tiny_lm_dir, tmp_path, field, value, expected):
    import shutil

    from jaxrisk.models import load_pretrained

    model = shutil.copytree(tiny_lm_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, **{field: value})))
    with pytest.raises(InputError) as e:
        load_pretrained(model)
    assert "config.json" in str(e.value) and expected in str(e.value)


def test_out_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    code, err = run_cli(["scan", "--weights", tmp_path / "missing.safetensors", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--out" in one_line(err) and "exists and is not a directory" in err


def test_out_that_cannot_be_created_is_refused(tmp_path, behaviors_file, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["redteam", "--model", tmp_path, "--behaviors", behaviors_file,
                         "--out", tmp_path / "file" / "sub"], capsys)
    assert code == 2 and "--out" in one_line(err) and "cannot write there" in err


def test_results_file_that_jaxrisk_did_not_write_is_refused(tiny_lm_dir, behaviors_file, tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text('{"name": "my own notes"}\n')
    code, err = run_cli(["redteam", "--model", tiny_lm_dir, "--behaviors", behaviors_file, "--out", tmp_path,
                         "--no-progress"], capsys)
    assert code == 2 and "results.jsonl:1: not a result row written by jaxrisk redteam" in one_line(err)
    assert (tmp_path / "results.jsonl").read_text() == '{"name": "my own notes"}\n'


@pytest.mark.parametrize("command, flag, value, expected", [
    ("redteam", "--group", "0", "expected an integer >= 1, got 0"),
    ("redteam", "--group", "-1", "expected an integer >= 1, got -1"),
    ("redteam", "--restarts", "0", "expected an integer >= 1, got 0"),
    ("redteam", "--search-width", "0", "expected an integer >= 1, got 0"),
    ("redteam", "--topk", "0", "expected an integer >= 1, got 0"),
    ("redteam", "--steps", "ten", "expected an integer, got 'ten'"),
    ("redteam", "--mellowmax", "0", "expected a number > 0, got 0"),
    ("redteam", "--fluency-weight", "nan", "expected a finite number"),
    ("generate", "--max-new-tokens", "-3", "expected an integer >= 1, got -3"),
    ("generate", "--top-k", "-5", "expected an integer >= 0, got -5"),
    ("generate", "--temperature", "-1", "expected a number >= 0, got -1"),
    ("zoo", "--trojaned", "-1", "expected an integer >= 0, got -1"),
    ("zoo", "--epochs", "0", "expected an integer >= 1, got 0"),
    ("scan", "--restarts", "0", "expected an integer >= 1, got 0"),
    ("scan", "--max-steps", "-2", "expected an integer >= 1, got -2"),
    ("scan", "--devices", "0", "expected an integer >= 1, got 0"),
    ("scan", "--seed", str(2 ** 40), "expected an integer <= 4294967295"),
    ("circuits", "--penalties", "3,x", "expected a number, got 'x'"),
    ("circuits", "--penalties", "-1", "expected a number >= 0, got -1"),
    ("circuits", "--steps", "0", "expected an integer >= 1, got 0"),
])
def test_every_flag_is_checked_by_its_parser_before_any_work(tmp_path, capsys, command, flag, value, expected):
    required = {"redteam": ["--model", tmp_path, "--behaviors", tmp_path / "b.csv", "--out", tmp_path],
                "generate": ["--model", tmp_path, "--prompt", "hi"], "zoo": ["--mnist", tmp_path, "--out", tmp_path],
                "scan": [], "circuits": ["--model", tmp_path, "--data", tmp_path / "d.jsonl", "--out", tmp_path]}
    code, err = run_cli([command, *required[command], flag, value], capsys)
    line = one_line(err)
    assert code == 2 and f"argument {flag}" in line and expected in line


def test_scan_flags_without_weights_are_not_silently_ignored(tmp_path, capsys):
    code, err = run_cli(["scan", "--mnist", tmp_path, "--arch", "mlp", "--out", tmp_path], capsys)
    assert code == 2 and "--mnist and --arch describe the model of --weights" in one_line(err)


def test_zoo_with_nothing_to_build_is_refused(tmp_path, capsys):
    code, err = run_cli(["zoo", "--mnist", tmp_path, "--out", tmp_path / "z", "--trojaned", 0, "--clean", 0], capsys)
    assert code == 2 and "nothing to build" in one_line(err)


def test_api_dtype_must_be_one_jaxrisk_computes_in(tiny_lm_dir):
    from jaxrisk.models import load_pretrained

    for dtype in ("nonsense", "float64", "int8"):
        with pytest.raises(InputError, match=f"dtype '{dtype}': expected one of float32, bfloat16, float16"):
            load_pretrained(tiny_lm_dir, dtype=dtype)


def test_api_masks_and_generation_arguments_are_checked(tiny_lm_dir):
    from jaxrisk.models import load_pretrained

    lm = load_pretrained(tiny_lm_dir)
    tokens = np.ones((1, 4), np.int32)
    with pytest.raises(InputError, match=r"head_mask_lh: expected shape \[2, 4\] \(layers x heads\), got \[4, 2\]"):
        lm(tokens, head_mask_lh=np.ones((4, 2)))
    with pytest.raises(InputError, match=r"neuron_mask_lf: expected shape \[2, 64\]"):
        lm.run_with_cache(tokens, neuron_mask_lf=np.ones((2, 3)))
    with pytest.raises(InputError, match=r"max_new_tokens: expected an integer, got 2.5"):
        lm.generate("Lily had a", max_new_tokens=2.5)
    with pytest.raises(InputError, match=r"temperature: expected a number >= 0, got -1"):
        lm.generate("Lily had a", temperature=-1)
    with pytest.raises(InputError, match=f"top_k: expected an integer <= {lm.cfg.vocab_size}, got 1000"):
        lm.generate("Lily had a", temperature=1.0, top_k=1000)


def test_engine_problem_configs_reject_bad_values():
    from jaxrisk.circuits import CircuitConfig, CircuitsConfig
    from jaxrisk.redteam import GCGConfig
    from jaxrisk.scan import InversionConfig
    from jaxrisk.search import RunConfig
    from jaxrisk.zoo import TrainConfig

    cases = [(lambda: GCGConfig(search_width=0), "GCGConfig.search_width: expected an integer >= 1"),
             (lambda: GCGConfig(topk=2.0), "GCGConfig.topk: expected an integer, got 2.0"),
             (lambda: CircuitConfig(kind="soft"), "CircuitConfig.kind: expected one of ste, hard_concrete"),
             (lambda: CircuitConfig(target_density=1.5), "CircuitConfig.target_density: expected a fraction"),
             (lambda: RunConfig(restarts=0), "RunConfig.restarts: expected an integer >= 1, got 0"),
             (lambda: InversionConfig(learning_rate=-0.1), "InversionConfig.learning_rate: expected a number > 0"),
             (lambda: TrainConfig(arch="vgg"),
              "TrainConfig.arch: expected one of mnist_cnn, lenet5, resnet8, mlp, got 'vgg'"),
             (lambda: CircuitsConfig(penalties=()), "CircuitsConfig.penalties: none given")]
    for build, expected in cases:
        with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(".", r"\.")):
            build()


def test_redteam_refuses_results_of_a_different_run(tiny_lm_dir, tmp_path):
    from jaxrisk.data.prompts import Behavior
    from jaxrisk.models import load_pretrained
    from jaxrisk import redteam
    from jaxrisk.redteam.report import run_settings, write_results
    from jaxrisk.search import RunConfig

    lm = load_pretrained(tiny_lm_dir)
    earlier = run_settings(lm, redteam.RedteamConfig())
    row = {"behavior": "Lily had a", "target": "ball", "prompt": "", "suffix_ids": [], "success": True, "run": earlier}
    write_results(tmp_path / "results.jsonl", [row])
    with pytest.raises(InputError, match=r"results.jsonl:1: a result of a different run \(other max_steps\)"):
        redteam.run(lm, [Behavior("Lily had a", "ball", 1)], redteam.RedteamConfig(run=RunConfig(max_steps=10)),
                    out_dir=tmp_path)


def test_redteam_results_name_the_danger_probe_they_were_searched_with(tiny_lm_dir):
    """A probe reading another layer or pooling otherwise makes another run (its results are not resumed into);
    one with train_probe's defaults is named as before, so earlier results still resume."""
    from jaxrisk import redteam
    from jaxrisk.models import load_pretrained
    from jaxrisk.redteam.report import run_settings
    from jaxrisk.scorers.probe import ProbeScorer

    lm = load_pretrained(tiny_lm_dir)
    probe = lambda layer, pool: ProbeScorer(params=None, w=None, b=None, mu=None, sigma=None,  # noqa: E731
                                            graphdef=None, layer=layer, pool=pool)
    named = lambda layer, pool: run_settings(lm, redteam.RedteamConfig(),  # noqa: E731
                                             [(1.0, probe(layer, pool))])["extras"]
    assert named(1, "mean") == [[1.0, "ProbeScorer"]]   # the tiny model's middle layer: the default
    assert named(1, "max") == [[1.0, "ProbeScorer", {"layer": 1, "pool": "max"}]]
    assert named(0, "mean") == [[1.0, "ProbeScorer", {"layer": 0, "pool": "mean"}]]


def test_stale_group_checkpoints_are_dropped_and_foreign_files_refused(tmp_path):
    from jaxrisk.redteam.run import _group_checkpoints
    from jaxrisk.search import RunConfig, run

    problem, lanes = _quadratic_problem()
    root = tmp_path / "checkpoint"
    for group in ("group-0", "group-2"):   # group 0 finished (its results written), group 2 interrupted
        run(problem, lanes, RunConfig(max_steps=2, chunk_steps=1, progress=False,
                                            checkpoint_dir=str(root / group)))
    _group_checkpoints(root, finished=2)
    assert sorted(p.name for p in root.iterdir()) == ["group-2"]
    (root / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holds files jaxrisk did not write \(notes.txt\)"):
        _group_checkpoints(root, finished=2)
    assert (root / "notes.txt").exists() and (root / "group-2").exists()


def test_tokenizer_ids_beyond_the_embedding_are_refused(tiny_lm_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from jaxrisk.models import load_pretrained

    model = shutil.copytree(tiny_lm_dir, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.add_tokens(["dragon"])
    tok.save_pretrained(str(model))
    lm = load_pretrained(model)
    with pytest.raises(InputError, match=f"token ids span .*{lm.cfg.vocab_size}; this model's vocabulary"):
        lm.encode("Lily saw a dragon")


@pytest.mark.slow
def test_circuit_search_that_turns_nan_is_an_error_not_a_circuit(tiny_lm_dir, tmp_path):
    from jaxrisk import circuits
    from jaxrisk.circuits import load_circuit_data
    from jaxrisk.models import load_pretrained
    from jaxrisk.search import RunConfig

    lm = load_pretrained(tiny_lm_dir)
    rows = [{"prompt": f"{n} had a", "completion": "red ball"} for n in ("Lily", "Tom")] * 3
    rows += [{"text": f"{n} went to the park"} for n in ("Lily", "Tom")] * 3
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_circuit_data(tmp_path / "d.jsonl", lm.tokenizer)
    params = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), lm.params)
    with pytest.raises(InputError, match=r"the circuit search turned NaN \(penalty 3 at step 0\)"):
        circuits.run(lm, data, circuits.CircuitsConfig(penalties=(3.0,), run=RunConfig(max_steps=2, progress=False)),
                     params=params)


def test_redteam_config_rejects_a_group_of_zero():
    from jaxrisk.redteam import RedteamConfig

    with pytest.raises(InputError, match="RedteamConfig.group: expected an integer >= 1, got 0"):
        RedteamConfig(group=0)
    with pytest.raises(InputError, match="RedteamConfig.method: expected one of gcg, arca"):
        RedteamConfig(method="pair")


def test_danger_probe_file_rows_are_checked(tiny_lm_dir, behaviors_file, tmp_path, capsys):
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "Lily had a ball", "label": 1}\n{"text": "Tom was sad", "label": "yes"}\n')
    code, err = run_cli(["redteam", "--model", tiny_lm_dir, "--behaviors", behaviors_file, "--out", tmp_path / "o",
                         "--danger-probe-data", probe], capsys)
    assert code == 2 and "probe.jsonl:2: expected a JSON object with 'text' and 'label'" in one_line(err)
    probe.write_text('{"text": "Lily had a ball", "label": 1}\n{"text": "Tom was sad", "label": 0}\n')
    code, err = run_cli(["redteam", "--model", tiny_lm_dir, "--behaviors", behaviors_file, "--out", tmp_path / "o",
                         "--danger-probe-data", probe, "--danger-probe-layer", "2"], capsys)
    assert code == 2 and "--danger-probe-layer: 2 is not a layer of the model (0..1)" in one_line(err)


# ---- 7. silently wrong results that must be right or refused -----------------------------------------

def test_csv_goals_keep_quoted_newlines_and_report_their_line(tmp_path):
    from jaxrisk.data.prompts import Behavior, load_behaviors

    path = tmp_path / "b.csv"
    path.write_text('goal,target\n"Tell me\na story",Sure\nsecond,ok\n')
    assert load_behaviors(path) == [Behavior("Tell me\na story", "Sure", 2), Behavior("second", "ok", 4)]


@pytest.mark.parametrize("text, expected", [
    ("goal,target\nhello,world,extra\n", "b.csv:2: more fields than the header's 2"),
    ("goal,target\n\nok,fine\n\nhello\n", "b.csv:5: fewer fields than the header's 2"),
])
def test_csv_rows_with_the_wrong_number_of_fields_are_named_by_line(tmp_path, text, expected):
    from jaxrisk.data.prompts import load_behaviors

    path = tmp_path / "b.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=expected):
        load_behaviors(path)


def test_jsonl_keeps_unicode_line_separators_and_refuses_deep_nesting(tmp_path):
    from jaxrisk.data.prompts import load_behaviors
    from jaxrisk.data.text import read_text

    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"goal": "a\u2028b", "target": "x"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_behaviors(path)[0].goal == "a\u2028b"
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(InputError, match="b.jsonl:1: not a JSON object"):
        load_behaviors(path)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfabc\n\xff")
    with pytest.raises(InputError, match=r"byte 0xff at offset 7, line 2"):
        read_text(bom)


@pytest.mark.parametrize("images, expected", [
    (lambda x: (x * 255).astype(np.uint8), "images are uint8; expected floats in \\[0, 1\\]"),
    (lambda x: x * 255, "image values span 0..255; expected \\[0, 1\\]"),
    (lambda x: np.where(x > 0.5, np.nan, x), "image values span nan..nan"),
])
def test_scan_refuses_images_outside_zero_one(images, expected):
    from jaxrisk.data import ImageSet, load_digits
    from jaxrisk.models import build
    from jaxrisk.scan import ScanConfig, run
    from jaxrisk.search import RunConfig

    digits = load_digits("test", size=8)
    bad = ImageSet(images(digits.images), digits.labels, "my images")
    with pytest.raises(InputError, match="my images: " + expected):
        run(build("mlp", input_shape=(1, 8, 8), hidden=(16,), num_classes=10), bad,
            ScanConfig(run=RunConfig(max_steps=2, progress=False)))


def test_token_ids_outside_the_vocabulary_are_refused(tiny_lm_dir):
    from jaxrisk.models import load_pretrained

    lm = load_pretrained(tiny_lm_dir)
    v = lm.cfg.vocab_size
    with pytest.raises(InputError, match=rf"tokens: token ids span 1\.\.{v}; this model's vocabulary is 0\.\.{v - 1}"):
        lm(np.asarray([[1, v]]))
    with pytest.raises(InputError, match=r"token ids span -1\.\.3"):
        lm(np.asarray([[-1, 3]]))
    with pytest.raises(InputError, match=r"prompt 0: token ids span 5\.\.99"):
        lm.generate([5, 99], 2)
    with pytest.raises(InputError, match=r"target_ids: token ids span 1000"):
        lm.score_targets([1, 2], [[3]], [1000])


def test_scan_refuses_a_model_with_fewer_than_three_classes():
    from jaxrisk.data import load_digits
    from jaxrisk.models import build
    from jaxrisk.scan import ScanConfig, run
    from jaxrisk.search import RunConfig

    with pytest.raises(InputError, match="the model has 2 output"):
        run(build("mlp", input_shape=(1, 8, 8), hidden=(16,), num_classes=2), load_digits("test", size=8),
            ScanConfig(run=RunConfig(max_steps=2, progress=False)))


def test_bfloat16_classifier_weights_are_accepted(mlp_file, tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    from jaxrisk.models import load_classifier
    from jaxrisk.models.weights import read_safetensors

    state = read_safetensors(mlp_file)
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, str(tmp_path / "bf16.safetensors"))
    full, half = load_classifier(mlp_file, "mlp"), load_classifier(tmp_path / "bf16.safetensors", "mlp")
    x = np.random.default_rng(0).random((4, 1, 8, 8), np.float32)
    a, b = np.asarray(full(jnp.asarray(x))), np.asarray(half(jnp.asarray(x)))
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()


# ---- 8. hangs: pipes and devices are refused without being opened ---------------------------------

def _returns_within(seconds: float, fn) -> BaseException | None:
    """Run `fn` in a thread; fail if it blocks longer than `seconds`; return what it raised."""
    outcome: list = []

    def target():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"blocked for more than {seconds} s")
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_inputs_are_refused_without_blocking(tmp_path):
    from jaxrisk.data.images import read_idx
    from jaxrisk.data.prompts import load_behaviors
    from jaxrisk.models import load_classifier

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for fn in (lambda: load_classifier(fifo, "mlp"), lambda: load_behaviors(fifo.rename(tmp_path / "pipe.csv")),
               lambda: read_idx(tmp_path / "pipe.csv")):
        error = _returns_within(10, fn)
        assert isinstance(error, InputError) and "not a regular file" in str(error), error


def test_cli_fifo_weights_exit_2(tmp_path, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "w.safetensors")
    code, err = run_cli(["scan", "--weights", tmp_path / "w.safetensors", "--arch", "mlp", "--out", tmp_path / "o"],
                        capsys)
    assert code == 2 and "not a regular file" in one_line(err)


def test_mnist_dir_with_corrupt_gzip_is_named(tmp_path):
    from jaxrisk.data import load_mnist

    write_mnist_format(tmp_path, n=10)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(InputError, match="t10k-images-idx3-ubyte.gz: cannot read"):
        load_mnist(tmp_path)
