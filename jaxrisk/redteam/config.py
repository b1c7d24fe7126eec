"""Configuration of the red-team searches: GCG's and ARCA's hyperparameters and the run around them."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxrisk.errors import InputError, require_choice, require_int, require_number
from jaxrisk.search.config import RunConfig

METHODS = ("gcg", "arca")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GCGConfig:
    search_width: int = 512          # B candidates per step
    topk: int = 256
    suffix_len: int = 20
    init_token: str = "!"            # the suffix starts as "! ! ! ..."
    mellowmax_alpha: float | None = None
    early_stop: bool = True
    filter_retokenization: bool = True
    oversample: int = 2              # draw oversample x B swaps so ~B survive the round-trip filter
    allow_non_ascii: bool = False

    def __post_init__(self):
        for name in ("search_width", "topk", "suffix_len", "oversample"):
            require_int(f"GCGConfig.{name}", getattr(self, name), 1)
        if self.mellowmax_alpha is not None:
            require_number("GCGConfig.mellowmax_alpha", self.mellowmax_alpha, 0.0, above=True)
        if not isinstance(self.init_token, str) or not self.init_token.strip():
            raise InputError(f"GCGConfig.init_token: expected a non-empty token text, got {self.init_token!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ARCAConfig:
    request_len: int = 6
    output_len: int = 4
    candidates: int = 64            # exact evaluations per step (the top-k of the first-order scores)
    plausibility_weight: float = 1.0
    danger_weight: float = 1.0

    def __post_init__(self):
        for name in ("request_len", "output_len", "candidates"):
            require_int(f"ARCAConfig.{name}", getattr(self, name), 1)
        for name in ("plausibility_weight", "danger_weight"):
            require_number(f"ARCAConfig.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RedteamConfig:
    """`run.restarts` lanes per behaviour, `group` behaviours per compiled engine run."""
    run: RunConfig = RunConfig(restarts=1, max_steps=250, chunk_steps=10)
    method: Literal["gcg", "arca"] = "gcg"
    group: int = 8
    gcg: GCGConfig = GCGConfig()
    arca: ARCAConfig = ARCAConfig()

    def __post_init__(self):
        require_choice("RedteamConfig.method", self.method, METHODS)
        require_int("RedteamConfig.group", self.group, 1)
        for name, kind in (("run", RunConfig), ("gcg", GCGConfig), ("arca", ARCAConfig)):
            if not isinstance(getattr(self, name), kind):
                raise InputError(f"RedteamConfig.{name}: expected a {kind.__name__}")
