"""Configuration of the hidden-trigger scan: the inversion's hyperparameters and the run around it."""

from __future__ import annotations

import dataclasses

from jaxrisk.errors import InputError, require_int, require_number
from jaxrisk.search.config import RunConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class InversionConfig:
    """Hyperparameters of the inversion loop (defaults: the paper's, on shorter epochs)."""
    batch_size: int = 32
    steps_per_epoch: int = 8
    learning_rate: float = 0.1
    init_cost: float = 1e-3
    success_threshold: float = 0.99
    patience: int = 3
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    early_stop_patience: int = 20
    early_stop_threshold: float = 0.99  # "improved" means best norm fell below this fraction of the old best

    def __post_init__(self):
        for name in ("batch_size", "steps_per_epoch", "patience", "early_stop_patience"):
            require_int(f"InversionConfig.{name}", getattr(self, name), 1)
        for name in ("learning_rate", "init_cost", "cost_up", "cost_down"):
            require_number(f"InversionConfig.{name}", getattr(self, name), 0.0, above=True)
        for name in ("success_threshold", "early_stop_threshold"):
            if not 0 < require_number(f"InversionConfig.{name}", getattr(self, name)) <= 1:
                raise InputError(f"InversionConfig.{name}: expected a fraction in (0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScanConfig:
    """`run.restarts` lanes per class (or pair); `run.max_steps` steps each, at most."""
    run: RunConfig = RunConfig(restarts=2, max_steps=500, chunk_steps=40)
    holdout: int = 500  # images kept aside to measure the recovered triggers' attack success
    pairs: bool = False  # source -> target pair mode instead of all-to-one
    inversion: InversionConfig = InversionConfig()

    def __post_init__(self):
        require_int("ScanConfig.holdout", self.holdout, 1)
        if not isinstance(self.run, RunConfig) or not isinstance(self.inversion, InversionConfig):
            raise InputError("ScanConfig: `run` must be a RunConfig and `inversion` an InversionConfig")
