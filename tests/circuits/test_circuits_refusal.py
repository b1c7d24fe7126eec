"""The alignment circuit of a refusal planted in the real stories260K: ablating a small circuit turns
refusals into compliance while keeping utility (its own file: the planted model is the suite's longest
fixture, and a file of its own lets it run beside the backdoor's)."""

import pytest


@pytest.mark.assets
@pytest.mark.slow
def test_cli_alignment_circuit_ablation_turns_refusal_into_compliance(refusing, tmp_path):
    import json

    from jaxrisk.cli import main
    from jaxrisk.models.hf import save_pretrained
    from jaxrisk.zoo.lm_refusal import RefusalConfig

    lm, params, data = refusing
    train = data["train"]
    rows = [{"prompt": lm.decode(p[1:]), "completion": RefusalConfig().refusal, "compliance": lm.decode(c)}
            for p, c, h in zip(train["prompts"], train["compliance"], train["harmful"]) if h]
    rows += [{"text": lm.decode(r[1:])} for r in data["clean"][:300]]
    path = tmp_path / "alignment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["circuits", "--model", str(save_pretrained(lm, params, tmp_path / "refusing")), "--data", str(path),
                 "--objective", "alignment", "--out", str(out), "--penalties", "4,8", "--steps", "200",
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["base_rate"] >= 0.95 and report["base_compliance"] == 0.0
    c = min(report["circuits"], key=lambda c: c["rate_ablated"])
    # measured on the full train split (penalty 8, 400 steps): 4.2% of units, ablated it refuses none of
    # the held-out harmful requests, utility 0.946; on the CLI's smaller split, 400 steps, 0.83 (at penalty 12
    # the circuit is too small: 58% still refused); the bars hold at 200 steps too
    assert c["units"] <= 0.1 and c["rate_ablated"] <= 0.05 and c["utility"] >= 0.8, c
    assert c["compliance_ablated"] > report["base_compliance"], c   # answers now start as the original's
