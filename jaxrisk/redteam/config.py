"""Configuration of the red-team searches: GCG's and ARCA's hyperparameters and the run around them."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxrisk.errors import InputError, require_choice, require_int, require_number
from jaxrisk.search.config import RunConfig

METHODS = ("gcg", "arca")
SELECT = ("loss", "matches")
POSITIONS = ("cyclic", "random")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GCGConfig:
    """GCG's hyperparameters. `GCGConfig(**PLAIN_GCG)` is plain GCG (Zou et al. 2023; single swaps at positions
    spread evenly), the baseline the stronger parts are measured against."""

    search_width: int = 512          # B candidates per step
    topk: int = 256
    suffix_len: int = 20
    init_token: str = "!"            # without init_from_target, the suffix starts as "! ! ! ..."
    mellowmax_alpha: float | None = None
    margin: float | None = None      # None: cross-entropy target loss; m: the margin loss (each target token the
    #                                  argmax by at least m logits; see problem.target_margin_loss)
    early_stop: bool = True
    filter_retokenization: bool = True
    oversample: int = 2              # draw oversample x B swaps so ~B survive the round-trip filter
    allow_non_ascii: bool = False
    # the stronger search: each part switchable (benchmarks/gcg_success.py measures what each buys); the defaults
    # are the parts that measured better than plain GCG on two seeds (PLAIN_GCG turns them off)
    select: Literal["loss", "matches"] = "matches"   # rank candidates by loss, or first by target tokens matched
    buffer_size: int = 0             # 0: move to each step's best candidate (GCG); K: search from the best of K kept
    n_replace: int = 1               # positions swapped per candidate at the first step ...
    n_replace_final: int = 1         # ... falling linearly to this by the last step (I-GCG's multi-coordinate)
    positions: Literal["cyclic", "random"] = "random"   # single swaps: positions spread evenly over the B candidates,
    #                                                     or each drawn at random (GCG's reference code)
    no_revisit: bool = False         # never evaluate a suffix twice (a per-lane Bloom filter of evaluated suffixes)
    max_perplexity: float | None = None   # never take a candidate whose request (goal + suffix) is more perplexing
    #                                       than this to the model itself (a perplexity filter)
    probe_layers: int = 0            # 0: off; L: probe sampling, the model's first L layers draft-rank the B candidates
    probe_ratio: int = 8             # ... and the model scores B/16 random ones and the draft's best B/probe_ratio
    init_from_target: bool = True    # start each suffix as the target's text repeated (else init_token repeated)
    restart_patience: int = 50       # 0: off; P: a lane whose best since its last restart has not improved for P steps
    #                                  starts again from its start suffix (the best ever is kept)
    restart_noise: float = 0.0       # share of the start's positions a restart replaces by random allowed tokens
    #                                  (0: back to the start itself; 1: a random suffix), so restarts explore elsewhere
    warm_start_step: int = 0         # 0: off; S: after S steps, unsolved behaviours go on from the suffix (their own
    #                                  best or one that solved another behaviour) scoring their target best

    def __post_init__(self):
        for name in ("search_width", "topk", "suffix_len", "oversample", "n_replace", "n_replace_final"):
            require_int(f"GCGConfig.{name}", getattr(self, name), 1)
        require_int("GCGConfig.buffer_size", self.buffer_size, 0)
        require_int("GCGConfig.warm_start_step", self.warm_start_step, 0)
        require_int("GCGConfig.restart_patience", self.restart_patience, 0)
        require_int("GCGConfig.probe_layers", self.probe_layers, 0)
        require_int("GCGConfig.probe_ratio", self.probe_ratio, 1)
        if not 0.0 <= require_number("GCGConfig.restart_noise", self.restart_noise, 0.0) <= 1.0:
            raise InputError(f"GCGConfig.restart_noise: expected a share in [0, 1], got {self.restart_noise!r}")
        require_choice("GCGConfig.select", self.select, SELECT)
        require_choice("GCGConfig.positions", self.positions, POSITIONS)
        if max(self.n_replace, self.n_replace_final) > self.suffix_len:
            raise InputError(f"GCGConfig.n_replace: {max(self.n_replace, self.n_replace_final)} positions per "
                             f"candidate, more than the suffix's {self.suffix_len}")
        if self.max_perplexity is not None:
            require_number("GCGConfig.max_perplexity", self.max_perplexity, 1.0)
        if self.margin is not None:
            require_number("GCGConfig.margin", self.margin, 0.0)
            if self.mellowmax_alpha is not None:
                raise InputError("GCGConfig.margin: the margin loss replaces the cross-entropy that mellowmax "
                                 "reweights; set one of margin and mellowmax_alpha")
        if self.mellowmax_alpha is not None:
            require_number("GCGConfig.mellowmax_alpha", self.mellowmax_alpha, 0.0, above=True)
        if not isinstance(self.init_token, str) or not self.init_token.strip():
            raise InputError(f"GCGConfig.init_token: expected a non-empty token text, got {self.init_token!r}")


# the default parts turned off: plain GCG (rank by loss, no restarts, "! ! ..." start, positions spread evenly)
PLAIN_GCG = {"select": "loss", "restart_patience": 0, "init_from_target": False, "positions": "cyclic"}


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
    system_prompt: str | None = None   # chat models: a system turn before the user's (goal + suffix)
    # GCG: settings of the extra scorers' weights swept as lanes of one program, [settings][extras] (e.g. the
    # weight of log p(request): ((0.0,), (0.3,), (1.0,))); one result row per behaviour and setting
    weight_grid: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        require_choice("RedteamConfig.method", self.method, METHODS)
        if self.weight_grid is not None:
            if self.method != "gcg":
                raise InputError("RedteamConfig.weight_grid: only GCG sweeps the extras' weights as lanes")
            try:
                grid = tuple(tuple(float(w) for w in setting) for setting in self.weight_grid)
            except (TypeError, ValueError):
                raise InputError(f"RedteamConfig.weight_grid: expected rows of numbers, got {self.weight_grid!r}")
            object.__setattr__(self, "weight_grid", grid)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise InputError(f"RedteamConfig.system_prompt: expected text or None, got {self.system_prompt!r}")
        require_int("RedteamConfig.group", self.group, 1)
        for name, kind in (("run", RunConfig), ("gcg", GCGConfig), ("arca", ARCAConfig)):
            if not isinstance(getattr(self, name), kind):
                raise InputError(f"RedteamConfig.{name}: expected a {kind.__name__}")
