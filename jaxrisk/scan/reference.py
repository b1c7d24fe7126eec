"""Clean reference models for the scan's verdict: `report.json`s of `jaxrisk scan` on clean models of the
same architecture, trained on the same data and scanned with the same inversion settings. Their per-class
trigger norms are the null a natural shortcut belongs to (`decide.reference_statistics`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxrisk.data.text import json_object
from jaxrisk.errors import InputError, require_number
from jaxrisk.scan.config import ScanConfig

# the report's settings that change the recovered norms (seed, devices, chunking and the holdout do not)
COMPARABLE = ("restarts", "max_steps", "inversion")


@dataclasses.dataclass(frozen=True)
class Reference:
    norms: np.ndarray    # [n, classes] each clean reference model's per-class trigger norm
    sources: list[str]   # where each row came from (the report files)
    architectures: list  # each report's recorded `architecture` (None in reports that predate it)


def load_reference(paths, config: ScanConfig) -> Reference:
    """The per-class trigger norms of n >= 2 clean models' reports, scanned with `config`'s inversion
    settings; every problem is an InputError naming the file and field."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise InputError(f"reference: give the reports of at least 2 clean models (their spread is the null); got "
                         f"{len(paths)}")
    if config.pairs:
        raise InputError("reference: the clean-reference verdict is for all-to-one scans, not --pairs")
    expected = {"restarts": config.run.restarts, "max_steps": config.run.max_steps,
                "inversion": _json_roundtrip(config.inversion)}
    rows, architectures = [], []
    for path in paths:
        report = json_object(path, "a report.json written by jaxrisk scan")
        classes = report.get("classes")
        if "pairs" in report or not isinstance(classes, list) or not classes:
            raise InputError(f"{path}: field `classes`: expected the per-class list of an all-to-one scan's "
                             "report.json (jaxrisk scan without --pairs)")
        norms = []
        for k, entry in enumerate(classes):
            norm = entry.get("l1_norm") if isinstance(entry, dict) else None
            norms.append(require_number(f"{path}: field `classes[{k}].l1_norm`", norm, 0.0, above=True))
            if entry.get("label") != k:
                raise InputError(f"{path}: field `classes[{k}].label`: expected {k} (classes in label order), got "
                                 f"{entry.get('label')!r}")
        recorded = report.get("config") if isinstance(report.get("config"), dict) else {}
        for name in COMPARABLE:
            if recorded.get(name) != expected[name]:
                raise InputError(f"{path}: field `config.{name}` is {recorded.get(name)!r} but this scan uses "
                                 f"{expected[name]!r}: scan the reference models with the same settings (their "
                                 "trigger norms depend on them)")
        rows.append(norms)
        architectures.append(report.get("architecture"))
    if len({len(r) for r in rows}) != 1:
        sizes = ", ".join(f"{p.name}: {len(r)}" for p, r in zip(paths, rows))
        raise InputError(f"reference: the reports have different numbers of classes ({sizes})")
    return Reference(np.array(rows), [str(p) for p in paths], architectures)


def _json_roundtrip(inversion) -> dict:
    """The inversion settings as report.json records them (floats and ints as JSON gives them back)."""
    return json.loads(json.dumps(dataclasses.asdict(inversion)))
