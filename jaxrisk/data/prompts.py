"""Behaviour files in the AdvBench / HarmBench layout: one row per behaviour with `goal` and `target`.

CSV (with a header row) or JSONL (one object per line). HarmBench's `Behavior`
column is accepted for `goal`. Every problem is reported with its file, line
and column.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from jaxrisk.errors import InputError

_GOAL_ALIASES = ("goal", "behavior", "Behavior", "prompt")


@dataclass(frozen=True)
class Behavior:
    goal: str
    target: str
    line: int  # where it came from, for error messages


def _rows(path: Path) -> list[tuple[int, dict]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{n}: expected a JSON object with 'goal' and 'target', got {type(row).__name__}")
            rows.append((n, row))
        return rows
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None:
            raise InputError(f"{path}: empty CSV (expected a header row with goal,target)")
        return [(n, row) for n, row in enumerate(reader, 2)]
    raise InputError(f"{path}: expected a .csv or .jsonl behaviour file")


def load_behaviors(path: str | Path) -> list[Behavior]:
    """Read and validate a behaviour file; raises InputError naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows = _rows(path)
    if not rows:
        raise InputError(f"{path}: no behaviours in the file")
    out = []
    for n, row in rows:
        goal_key = next((k for k in _GOAL_ALIASES if k in row), None)
        missing = [c for c, ok in (("goal", goal_key is not None), ("target", "target" in row)) if not ok]
        if missing:
            raise InputError(f"{path}:{n}: missing column(s) {', '.join(missing)}; found {sorted(row)} "
                             "(expected the AdvBench layout: goal,target)")
        goal, target = row[goal_key], row["target"]
        for name, value in (("goal", goal), ("target", target)):
            if not isinstance(value, str):
                raise InputError(f"{path}:{n}: {name} must be text, got {type(value).__name__}")
        if not goal.strip():
            raise InputError(f"{path}:{n}: empty goal")
        if not target.strip():
            raise InputError(f"{path}:{n}: empty target (the string the model should be made to say)")
        out.append(Behavior(goal=goal, target=target, line=n))
    return out
