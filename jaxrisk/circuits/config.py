"""Configuration of circuit discovery: the mask search's hyperparameters and the run around it."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxrisk.circuits.masks import GRANULARITIES
from jaxrisk.errors import InputError, require_choice, require_int, require_number
from jaxrisk.search.config import RunConfig

OBJECTIVES = ("remove", "backdoor", "alignment")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CircuitConfig:
    objective: Literal["remove", "backdoor", "alignment"] = "remove"
    granularity: Literal["heads", "neurons", "both"] = "both"
    kind: Literal["ste", "hard_concrete"] = "ste"
    init: float = -2.0              # start with (almost) nothing in the circuit
    learning_rate: float = 0.1
    remove_weight: float = 1.0      # w_x
    keep_weight: float = 1.0        # w_y
    alone_weight: float = 0.1       # w_alone (backdoor, alignment): small, a circuit alone is a weak model
    overlap_weight: float = 1.0     # w_overlap (backdoor)
    batch: int = 16
    remove_loss: Literal["probability", "onset"] = "onset"   # what is left of X: p, or -log(1 - p(first token))
    keep: Literal["ce", "kl"] = "kl"      # clean behaviour kept: data cross-entropy, or KL to the intact model
    ablation: Literal["zero", "mean"] = "zero"   # an ablated unit is zeroed, or set to its clean-text mean
    target_density: float | None = None   # Lagrangian form: the penalty becomes a multiplier driven to hit it
    multiplier_rate: float = 1.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise InputError(f"circuit objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        require_choice("CircuitConfig.granularity", self.granularity, GRANULARITIES)
        require_choice("CircuitConfig.kind", self.kind, ("ste", "hard_concrete"))
        require_choice("CircuitConfig.keep", self.keep, ("ce", "kl"))
        require_choice("CircuitConfig.remove_loss", self.remove_loss, ("probability", "onset"))
        require_choice("CircuitConfig.ablation", self.ablation, ("zero", "mean"))
        require_int("CircuitConfig.batch", self.batch, 1)
        for name in ("init", "remove_weight", "keep_weight", "alone_weight", "overlap_weight"):
            require_number(f"CircuitConfig.{name}", getattr(self, name))
        for name in ("learning_rate", "multiplier_rate"):
            require_number(f"CircuitConfig.{name}", getattr(self, name), 0.0, above=True)
        if self.target_density is not None and not 0 < require_number("target_density", self.target_density) < 1:
            raise InputError(f"CircuitConfig.target_density: expected a fraction in (0, 1), got {self.target_density}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CircuitsConfig:
    """One circuit per penalty (sparsity weight) x `run.restarts`, all lanes of one compiled run; the
    restart with the lowest final loss stands for its penalty, and the Pareto front is taken over all lanes.
    The default sweep spans 8x in the penalty so that it holds both empty and faithful circuits."""
    run: RunConfig = RunConfig(max_steps=400, chunk_steps=100, restarts=2)
    penalties: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
    search: CircuitConfig = CircuitConfig()

    def __post_init__(self):
        penalties = tuple(require_number("CircuitsConfig.penalties", p, 0.0) for p in self.penalties)
        if not penalties:
            raise InputError("CircuitsConfig.penalties: none given (one circuit is learned per sparsity weight)")
        object.__setattr__(self, "penalties", penalties)
        for name, kind in (("run", RunConfig), ("search", CircuitConfig)):
            if not isinstance(getattr(self, name), kind):
                raise InputError(f"CircuitsConfig.{name}: expected a {kind.__name__}")
