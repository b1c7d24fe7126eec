"""`jaxrisk plan`: per-device memory of a GCG search, from the engine's own program compiled ahead of time."""

import dataclasses
import json

import jax.numpy as jnp
import pytest

from jaxrisk.cli import main
from jaxrisk.models.lm_config import config_from_hf
from jaxrisk.models.named import NAMED_CONFIGS, named_config
from jaxrisk.redteam import GCGConfig
from jaxrisk.redteam.plan import GiB, _compiled, _per_device_bytes, abstract_params, plan_gcg
from jaxrisk.search import RunConfig

SMALL = config_from_hf(dict(NAMED_CONFIGS["llama-3.2-1b"], hidden_size=128, intermediate_size=256,
                            num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                            vocab_size=1024))


@pytest.mark.slow
def test_layers_extend_linearly_to_the_full_program():
    """The plan compiles 2 and 3 layers and extends the temporaries linearly: within 10% of compiling all 6."""
    run, gcg = RunConfig(devices=2), GCGConfig(search_width=64, suffix_len=10)
    plan = plan_gcg(SMALL, dtype=jnp.float32, run=run, gcg=gcg, lanes=4, prompt_len=12, target_len=6)
    full, _ = _compiled(SMALL, jnp.float32, run.mesh(), gcg, 4, 12, 6, 8)
    assert abs(plan.candidates - full.temp_size_in_bytes) <= 0.1 * full.temp_size_in_bytes
    assert plan.lanes_per_device == 2


@pytest.mark.slow
def test_wider_searches_need_more_memory_and_more_lanes_per_device_too():
    run = RunConfig(devices=4)
    kw = dict(dtype=jnp.float32, run=run, prompt_len=12, target_len=6)
    two_layers = dataclasses.replace(SMALL, n_layers=2)   # compiled whole: one program per plan
    narrow = plan_gcg(two_layers, gcg=GCGConfig(search_width=32, suffix_len=10), lanes=4, **kw)
    wide = plan_gcg(two_layers, gcg=GCGConfig(search_width=128, suffix_len=10), lanes=4, **kw)
    crowded = plan_gcg(two_layers, gcg=GCGConfig(search_width=32, suffix_len=10), lanes=16, **kw)
    assert wide.candidates > 2 * narrow.candidates and wide.weights == narrow.weights
    assert crowded.lanes_per_device == 4 and crowded.candidates > 2 * narrow.candidates


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen2.5-7b"])
def test_full_size_weights_split_over_the_model_axes(name):
    """Abstract meshes: an 8B / 7B model's bfloat16 weights whole on every device of (restarts 8), an eighth of them
    per device on (fsdp 2 x tensor 4), nothing allocated."""
    cfg = named_config(name)
    whole = _per_device_bytes(abstract_params(cfg, jnp.bfloat16, RunConfig(devices=8).mesh())[1])
    split = _per_device_bytes(abstract_params(cfg, jnp.bfloat16, RunConfig(devices=8, fsdp=2, tensor=4).mesh())[1])
    assert whole == 2 * cfg.n_params()
    assert whole / 8 <= split < whole / 8 * 1.01


@pytest.mark.slow
def test_llama3_8b_gcg_plan_on_eight_devices():
    """The whole plan at the 8B shape (2 and 3 layers compiled on 8 simulated devices): with the weights split 8 ways a
    512-wide search of 8 lanes fits an 80 GiB device; replicated on each of 8 devices, the weights alone take 15 GiB."""
    cfg = named_config("llama-3-8b")
    plan = plan_gcg(cfg, run=RunConfig(devices=8, fsdp=2, tensor=4), gcg=GCGConfig(search_width=512), lanes=8)
    assert plan.lanes_per_device == 8 and 1.8 < plan.weights / GiB < 1.9
    assert plan.candidates > plan.weights and plan.total < 80 * GiB


@pytest.mark.slow
def test_cli_reports_the_widest_search_that_fits(tiny_lm_dir, capsys):
    argv = ["plan", "--model", str(tiny_lm_dir), "--devices", "8", "--tensor", "2", "--search-widths", "16,64,256",
            "--dtype", "float32", "--topk", "4", "--json"]
    assert main(argv + ["--memory-gb", "1000"]) == 0
    everything = json.loads(capsys.readouterr().out)
    totals = [p["total"] for p in everything["plans"]]
    assert totals == sorted(totals) and everything["widest_fitting"] == 256
    between = (totals[1] + totals[2]) / 2 / GiB
    assert main(argv + ["--memory-gb", str(between)]) == 0
    assert json.loads(capsys.readouterr().out)["widest_fitting"] == 64
    assert main(argv + ["--memory-gb", str(totals[0] / 2 / GiB)]) == 0
    assert json.loads(capsys.readouterr().out)["widest_fitting"] is None


def test_plan_needs_a_model_or_a_named_config(tiny_lm_dir, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--devices", "8"])
    assert "one of the arguments --model --config is required" in capsys.readouterr().err
    assert main(["plan", "--model", str(tiny_lm_dir), "--devices", "8"]) == 2   # topk 256 > its vocabulary
    assert "--topk 256: more than the model's" in capsys.readouterr().err
