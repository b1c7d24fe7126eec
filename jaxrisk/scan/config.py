"""Configuration of the hidden-trigger scan: the inversion's hyperparameters and the run around it."""

from __future__ import annotations

import dataclasses

from jaxrisk.errors import InputError, require_int, require_number
from jaxrisk.search.config import RunConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class InversionConfig:
    """Hyperparameters of the inversion loop (defaults: the paper's, on shorter epochs and half its batch:
    16 images per step kept the detection study's verdicts at half the cost, BENCHMARKS.md)."""
    batch_size: int = 16
    steps_per_epoch: int = 8
    learning_rate: float = 0.1
    init_cost: float = 1e-3
    success_threshold: float = 0.99
    patience: int = 3
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    early_stop_patience: int = 20
    early_stop_threshold: float = 0.99  # "improved" means best norm fell below this fraction of the old best
    # TABOR's regularisers (Guo et al. 2019), off at 0: total variation of the mask (scattered triggers);
    # "blocking": the image with the trigger area blanked keeps its true label; "overlaying": the trigger
    # alone, on a black image, gives the target
    smoothness: float = 0.0
    blocking: float = 0.0
    overlaying: float = 0.0

    def __post_init__(self):
        for name in ("batch_size", "steps_per_epoch", "patience", "early_stop_patience"):
            require_int(f"InversionConfig.{name}", getattr(self, name), 1)
        for name in ("learning_rate", "init_cost", "cost_up", "cost_down"):
            require_number(f"InversionConfig.{name}", getattr(self, name), 0.0, above=True)
        for name in ("smoothness", "blocking", "overlaying"):
            require_number(f"InversionConfig.{name}", getattr(self, name), 0.0)
        for name in ("success_threshold", "early_stop_threshold"):
            if not 0 < require_number(f"InversionConfig.{name}", getattr(self, name)) <= 1:
                raise InputError(f"InversionConfig.{name}: expected a fraction in (0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MarginConfig:
    """The reference's 300 steps at lr 1e-2, with 10 random starts per class (it uses 30) and p <= 0.01
    flags (it uses 0.05): in the detection study 10 starts gave the same p-values within their spread at a
    third of the cost; at 0.05 MM-BD flagged 1 of its 16 clean models, and 2 of a fresh zoo's 10, where
    0.01 flagged none and the combined verdict lost no trojaned model (BENCHMARKS.md)."""
    starts: int = 10
    steps: int = 300
    learning_rate: float = 1e-2
    alpha: float = 0.01

    def __post_init__(self):
        require_int("MarginConfig.starts", self.starts, 1)
        require_int("MarginConfig.steps", self.steps, 1)
        require_number("MarginConfig.learning_rate", self.learning_rate, 0.0, above=True)
        if not 0 < require_number("MarginConfig.alpha", self.alpha) < 1:
            raise InputError(f"MarginConfig.alpha: expected a significance level in (0, 1), got {self.alpha}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecisionConfig:
    """How the scan's statistics become one verdict (`decide.py`). The size cut (a robust z of 2.5) was set
    before the zoo study; the asymmetry cut (getting out of the class 2x harder than getting in) was raised
    from the first choice, 1.5x, on the study's calibration half, where the natural class 2 of clean MNIST
    CNNs measured 1.6-1.7x, and then held fixed for its evaluation half (BENCHMARKS.md). The clean-reference
    test (a Student-t p-value, Bonferroni over the classes, at 0.01 like MM-BD) was designed after the
    study and checked on two fresh zoos."""
    size_z: float = 2.5               # a class's size statistic must reach this...
    asymmetry: float = 0.693          # ...and its asymmetry this (log 2), when the symmetry search runs...
    size_ratio: float = 1.0           # ...and its norm be at most this fraction of the others' median (1: no cut)
    symmetry: bool = True             # run the symmetry search (off: the size statistic alone decides)
    suspect_z: float | None = None    # classes at or above this size statistic get the symmetry search
    max_suspects: int = 3             # (default: at `size_z`), at most this many, the largest first
    reference_alpha: float = 0.01     # with clean reference scans: flag at `reference_p` <= this (decide.py)

    def __post_init__(self):
        for name in ("size_z", "asymmetry"):
            require_number(f"DecisionConfig.{name}", getattr(self, name))
        if not 0 < require_number("DecisionConfig.reference_alpha", self.reference_alpha) < 1:
            raise InputError(f"DecisionConfig.reference_alpha: expected a significance level in (0, 1), got "
                             f"{self.reference_alpha}")
        require_number("DecisionConfig.size_ratio", self.size_ratio, 0.0, above=True)
        if self.suspect_z is not None:
            require_number("DecisionConfig.suspect_z", self.suspect_z)
        require_int("DecisionConfig.max_suspects", self.max_suspects, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScanConfig:
    """`run.restarts` lanes per class (or pair); `run.max_steps` steps each, at most. The defaults (1 restart,
    300 steps) gave the detection study the verdicts of 2 restarts x 500 steps at a third of the cost."""
    run: RunConfig = RunConfig(restarts=1, max_steps=300, chunk_steps=50)
    holdout: int = 500  # images kept aside to measure the recovered triggers' attack success
    pairs: bool = False  # source -> target pair mode instead of all-to-one
    inversion: InversionConfig = InversionConfig()
    margin: MarginConfig | None = MarginConfig()   # MM-BD's data-free maximum-margin test (None: off)
    decision: DecisionConfig = DecisionConfig()

    def __post_init__(self):
        require_int("ScanConfig.holdout", self.holdout, 1)
        if not isinstance(self.run, RunConfig) or not isinstance(self.inversion, InversionConfig):
            raise InputError("ScanConfig: `run` must be a RunConfig and `inversion` an InversionConfig")
        if not isinstance(self.decision, DecisionConfig):
            raise InputError("ScanConfig: `decision` must be a DecisionConfig")
        if self.margin is not None and not isinstance(self.margin, MarginConfig):
            raise InputError("ScanConfig: `margin` must be a MarginConfig or None")
