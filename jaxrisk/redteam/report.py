"""The red-team result: one row per behaviour in OUT/results.jsonl, and the checks a resume needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxrisk.data.text import jsonl_rows
from jaxrisk.errors import InputError
from jaxrisk.io import atomic_write, json_text
from jaxrisk.redteam.config import RedteamConfig


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


def run_settings(lm, config: RedteamConfig, extras=()) -> dict:
    """What makes two redteam runs the same run: each result row carries it, and a resume checks it."""
    run = config.run
    settings = {"model": str(Path(lm.path).resolve()) if lm.path else None, "gcg": dataclasses.asdict(config.gcg),
                "restarts": run.restarts, "max_steps": run.max_steps, "seed": run.seed,
                "extras": [[float(w), type(scorer).__name__] for w, scorer in extras]}
    if config.system_prompt is not None:   # only when set: results written before this setting still resume
        settings["system_prompt"] = config.system_prompt
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
