"""Configuration of anomaly detection: which detector, which layers, how scores become a verdict."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxrisk.errors import InputError, require_choice, require_int, require_number
from jaxrisk.search.config import RunConfig

ACTIVATION_DETECTORS = ("mahalanobis", "que", "spectral", "spectre", "probe")
DETECTOR_NAMES = ACTIVATION_DETECTORS + ("distillation",)
AGGREGATES = ("mean", "max")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """The distillation-discrepancy detector's student and its training (see `anomaly.distill`)."""
    direction: Literal["forward", "reverse"] = "forward"   # KL(model || student); reverse: KL(student || model)
    temperature: float = 1.0
    steps: int = 2000
    batch: int = 128
    learning_rate: float = 1e-3
    hidden: tuple[int, ...] = (64,)        # classifier students: MLP hidden widths
    layers: int | None = None              # LM students: blocks kept (default: half, at least 1)

    def __post_init__(self):
        require_choice("DistillConfig.direction", self.direction, ("forward", "reverse"))
        for name in ("temperature", "learning_rate"):
            require_number(f"DistillConfig.{name}", getattr(self, name), 0.0, above=True)
        for name in ("steps", "batch"):
            require_int(f"DistillConfig.{name}", getattr(self, name), 1)
        if self.layers is not None:
            require_int("DistillConfig.layers", self.layers, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DetectConfig:
    """A detector fit per layer on trusted activations (and, for que / spectral / spectre, on the untrusted
    ones: by default the inputs themselves), layer scores standardised by their mean and spread on
    `calibration` of the trusted rows held out of the fit, then aggregated (`mean` or `max` over layers).
    An input is flagged when its aggregate exceeds the (1 - `fpr`) quantile of the held-out trusted
    aggregates: about `fpr` of clean inputs are flagged. `probe` needs labels: each input is scored by a
    probe fit on the other folds (`folds`), never on itself; so are the inputs when they are also the
    untrusted set (que / spectral / spectre without a separate untrusted set)."""
    run: RunConfig = RunConfig()
    detector: str = "que"
    aggregate: str = "mean"
    fpr: float = 0.01
    calibration: float = 0.2
    shrinkage: float | None = None             # None: Ledoit-Wolf
    alpha: float = 4.0                         # QUE's exponent
    trim: float = 0.3                          # SPECTRE: bound on the contaminated fraction of trusted + untrusted
    folds: int = 5                             # cross-fitting folds (probe; inputs as the untrusted set)
    batch: int = 8192                          # rows per streamed statistic and per scoring call
    distill: DistillConfig = DistillConfig()   # the distillation detector's student

    def __post_init__(self):
        require_choice("DetectConfig.detector", self.detector, DETECTOR_NAMES)
        require_choice("DetectConfig.aggregate", self.aggregate, AGGREGATES)
        for name in ("fpr", "calibration", "trim"):
            value = require_number(f"DetectConfig.{name}", getattr(self, name), 0.0, above=True)
            if value >= 1:
                raise InputError(f"DetectConfig.{name}: expected a fraction in (0, 1), got {value}")
        if self.shrinkage is not None and not 0 <= require_number("DetectConfig.shrinkage", self.shrinkage) <= 1:
            raise InputError(f"DetectConfig.shrinkage: expected a fraction in [0, 1] or None, got {self.shrinkage}")
        require_number("DetectConfig.alpha", self.alpha, 0.0, above=True)
        require_int("DetectConfig.folds", self.folds, 2)
        require_int("DetectConfig.batch", self.batch, 1)

    def replace(self, **changes) -> "DetectConfig":
        return dataclasses.replace(self, **changes)
