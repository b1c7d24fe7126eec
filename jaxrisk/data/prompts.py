"""Behaviour files in the AdvBench / HarmBench layout: one row per behaviour with `goal` and `target`.

CSV (with a header row) or JSONL (one object per line). HarmBench's `Behavior`
column is accepted for `goal`. Every problem is reported with its file, line
and column.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from jaxrisk.data.text import jsonl_rows, read_text, regular_file
from jaxrisk.errors import InputError

_GOAL_ALIASES = ("goal", "behavior", "Behavior", "prompt")


@dataclass(frozen=True)
class Behavior:
    goal: str
    target: str
    line: int  # where it came from, for error messages


def _rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        return jsonl_rows(path, "'goal' and 'target'")
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))   # quoted newlines stay in the field
        try:
            if reader.fieldnames is None:
                raise InputError(f"{path}: empty CSV (expected a header row with goal,target)")
            rows = []
            for row in reader:   # reader.line_num: the physical line where this row ended
                line = reader.line_num - sum(str(v).count("\n") for v in row.values() if v is not None)
                if None in row:
                    raise InputError(f"{path}:{line}: more fields than the header's {len(reader.fieldnames)}")
                if None in row.values():
                    raise InputError(f"{path}:{line}: fewer fields than the header's {len(reader.fieldnames)}")
                rows.append((line, row))
            return rows
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    raise InputError(f"{path}: expected a .csv or .jsonl behaviour file")


def load_behaviors(path: str | Path) -> list[Behavior]:
    """Read and validate a behaviour file; raises InputError naming the file, line and column."""
    path = regular_file(path)
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
