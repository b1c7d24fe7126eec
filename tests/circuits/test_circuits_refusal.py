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
    # the smallest circuit found by the remove objective (refusal's onset), one restart per penalty: SafeSeek's
    # alignment result in miniature. Measured (200 steps): penalty 8 -> 2 heads + 11 neurons (1.44% of units),
    # refusal 100% -> 0%, utility 0.951, 61% of ablated answers start as the original model's compliance;
    # penalty 4 -> 2.0%, 0.955. The full sweep (400 steps, 8 lanes) finds 0.44-0.67%: BENCHMARKS.md
    assert main(["circuits", "--model", str(save_pretrained(lm, params, tmp_path / "refusing")), "--data", str(path),
                 "--objective", "remove", "--out", str(out), "--penalties", "4,8", "--restarts", "1",
                 "--steps", "200", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["base_rate"] >= 0.95 and report["base_compliance"] == 0.0
    c = min(report["circuits"], key=lambda c: (c["rate_ablated"], c["units"]))
    assert c["units"] <= 0.03 and c["rate_ablated"] <= 0.05 and c["utility"] >= 0.93, c
    assert c["compliance_ablated"] > report["base_compliance"], c   # answers now start as the original's
