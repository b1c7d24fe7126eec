"""The red-team result: one row per behaviour in OUT/results.jsonl, and the checks a resume needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxrisk.data.text import jsonl_rows
from jaxrisk.errors import InputError
from jaxrisk.io import atomic_write, json_text
from jaxrisk.redteam.config import RedteamConfig
from jaxrisk.scorers.probe import ProbeScorer, default_probe_layer


@dataclasses.dataclass(frozen=True)
class RedteamResult:
    rows: list[dict]   # one per behaviour, in results.jsonl's layout

    @property
    def successes(self) -> int:
        return sum(bool(r["success"]) for r in self.rows)

    def write(self, out_dir: str | Path) -> Path:
        """OUT/results.jsonl, atomically."""
        path = Path(out_dir) / "results.jsonl"
        write_results(path, self.rows)
        return path


RESULT_KEYS = ("behavior", "target", "prompt", "suffix_ids", "success", "run")


def plausibility_front(rows: list[dict]) -> list[dict]:
    """Per swept weight setting (rows of a `weight_grid` run): attack success and the median perplexity of the
    requests (goal + suffix), exp(-mean log p) from the run's `SequenceScorer`."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "extra_weights" in row and "error" not in row:
            groups.setdefault(tuple(row["extra_weights"]), []).append(row)
    front = []
    for weights, mine in groups.items():
        logp = [next((v for k, v in r["scores"].items() if k.startswith("SequenceScorer_")), None) for r in mine]
        successes = sum(bool(r["success"]) for r in mine)
        front.append({"weights": list(weights), "successes": successes, "behaviours": len(mine),
                      "success_rate": successes / len(mine),
                      "median_request_perplexity": (float(np.median(np.exp(-np.asarray(logp))))
                                                    if None not in logp else None)})
    return front


def plot_plausibility_front(front: list[dict], path: Path, title: str, reference: float | None = None) -> Path:
    """PNG: attack success against median request perplexity, one point per weight setting; `reference`: the
    perplexity of natural requests (e.g. the goals alone), drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in front if p["median_request_perplexity"] is not None]
    x = [p["median_request_perplexity"] for p in points]
    y = [100 * p["success_rate"] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(x, y, "o-")
    for p, xi, yi in zip(points, x, y):
        ax.annotate("w=" + ",".join(f"{w:g}" for w in p["weights"]), (xi, yi), textcoords="offset points",
                    xytext=(5, 5))
    if reference is not None:
        ax.axvline(reference, color="grey", ls="--", label="the goals alone")
        ax.legend()
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.set_xlabel("median request perplexity (goal + suffix, under the model)")
    ax.set_ylabel("attack success (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


# GCG fields added after results were first written, with their defaults: a row's settings name them only when
# set, so results written before them still resume
LATER_GCG_FIELDS = {"margin": None, "restart_patience": 0, "probe_layers": 0, "probe_ratio": 8,
                    "init_from_target": False, "positions": "cyclic", "restart_noise": 0.0}


def _extra_setting(weight, scorer, lm) -> list:
    """An extra scorer as a row's settings name it: its weight and class, and for a danger probe that reads another
    layer or pools otherwise than `train_probe`'s defaults, which (a probe with the defaults is named as before
    this was recorded, so its results still resume)."""
    setting = [float(weight), type(scorer).__name__]
    if isinstance(scorer, ProbeScorer) and (scorer.layer, scorer.pool) != (default_probe_layer(lm.cfg), "mean"):
        setting.append({"layer": scorer.layer, "pool": scorer.pool})
    return setting


def run_settings(lm, config: RedteamConfig, extras=()) -> dict:
    """What makes two redteam runs the same run: each result row carries it, and a resume checks it."""
    run = config.run
    gcg = {name: value for name, value in dataclasses.asdict(config.gcg).items()
           if name not in LATER_GCG_FIELDS or value != LATER_GCG_FIELDS[name]}
    settings = {"model": str(Path(lm.path).resolve()) if lm.path else None, "gcg": gcg,
                "restarts": run.restarts, "max_steps": run.max_steps, "seed": run.seed,
                "extras": [_extra_setting(w, scorer, lm) for w, scorer in extras]}
    if config.system_prompt is not None:   # only when set: results written before these settings still resume
        settings["system_prompt"] = config.system_prompt
    if config.weight_grid is not None:
        settings["weight_grid"] = [list(setting) for setting in config.weight_grid]   # as JSON reads it back
    if config.method != "gcg":
        settings.update(method=config.method, arca=dataclasses.asdict(config.arca))
        del settings["gcg"]
    return settings


def write_results(path: Path, rows: list[dict]) -> None:
    text = "".join(json_text(r) + "\n" for r in rows)
    atomic_write(path, lambda f: f.write(text))


def read_results(path: Path, settings: dict) -> list[dict]:
    """The rows of an earlier run's results.jsonl, each checked to be one this same run wrote."""
    rows = []
    for n, row in jsonl_rows(path, "a result row written by jaxrisk redteam"):
        missing = [k for k in RESULT_KEYS if k not in row]
        if missing or not all(isinstance(row[k], str) for k in ("behavior", "target")):
            raise InputError(f"{path}:{n}: not a result row written by jaxrisk redteam (missing or non-text "
                             f"{', '.join(missing) or 'behavior/target'}); move the file away or choose another --out")
        if row["run"] != settings:
            changed = sorted(k for k in settings if row["run"].get(k) != settings[k]) if isinstance(row["run"], dict) \
                else ["all"]
            raise InputError(f"{path}:{n}: a result of a different run (other {', '.join(changed)}); resuming would "
                             "mix the two: choose another --out or move the file away")
        rows.append(row)
    return rows
