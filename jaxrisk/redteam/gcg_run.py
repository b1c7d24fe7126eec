"""GCG over a group of behaviours: one engine run of behaviours x restarts lanes, one row per behaviour."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import InputError
from jaxrisk.redteam.config import GCGConfig
from jaxrisk.redteam.lanes import encode_behaviors
from jaxrisk.redteam.problem import GCGProblem, RoundTrip, allowed_tokens
from jaxrisk.search import engine
from jaxrisk.search.config import RunConfig
from jaxrisk.search.reduce import best_per_group


def init_suffix(tokenizer, cfg: GCGConfig) -> np.ndarray:
    ids = tokenizer(" ".join([cfg.init_token] * cfg.suffix_len), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"init token {cfg.init_token!r} encodes to nothing")
    ids = (ids * cfg.suffix_len)[:cfg.suffix_len]
    return np.asarray(ids, np.int32)


def check_roundtrip(tokenizer, suffix: np.ndarray) -> None:
    if not RoundTrip(tokenizer)(suffix[None])[0]:
        text = tokenizer.decode(suffix.tolist())
        raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} cannot round-trip the initial "
                         f"suffix {text!r} (decode then encode gives other ids); pick another init token or "
                         "run without the re-tokenisation filter")


def run_group(lm, behaviors: list[Behavior], cfg: GCGConfig, run_cfg: RunConfig, *, extras=(),
              source: str = "behaviours", system_prompt: str | None = None) -> list[dict]:
    """GCG for these behaviours x `run_cfg.restarts` in one engine run; one result dict per behaviour
    (its best restart)."""
    tok = lm.tokenizer
    restarts = run_cfg.restarts
    lanes, after = encode_behaviors(lm, behaviors, cfg.suffix_len, source, system_prompt)
    suffix0 = init_suffix(tok, cfg)
    if cfg.filter_retokenization:
        check_roundtrip(tok, suffix0)
    allowed = allowed_tokens(tok, lm.cfg.vocab_size, cfg.allow_non_ascii)
    if allowed.sum() < cfg.topk:
        raise InputError(f"only {int(allowed.sum())} tokens are allowed, fewer than topk={cfg.topk}")
    problem = GCGProblem(params=lm.params, after=jnp.asarray(after), allowed=jnp.asarray(allowed),
                         init_suffix=jnp.asarray(suffix0), graphdef=lm.graphdef, cfg=cfg,
                         roundtrip=RoundTrip(tok) if cfg.filter_retokenization else None, extras=tuple(extras),
                         max_steps=run_cfg.max_steps)
    lane_inputs = {k: np.repeat(v, restarts, axis=0) for k, v in lanes.items()}   # behaviour-major
    result = engine.run(problem, lane_inputs, run_cfg, desc="gcg")
    state = result.state
    groups = [np.arange(i * restarts, (i + 1) * restarts) for i in range(len(behaviors))]
    best = best_per_group(groups, lambda r: (not state.success[r], float(state.best_loss[r])))
    out = []
    for i, (bh, rows, r) in enumerate(zip(behaviors, groups, best)):
        r = int(r)
        suffix = state.best[r]
        before = lanes["before"][i][lanes["before_valid"][i]]
        target = lanes["target"][i][lanes["target_valid"][i]]
        prompt_ids = np.concatenate([before, suffix, after]).astype(np.int32)
        greedy = lm.generate([prompt_ids], max_new_tokens=len(target))[0]
        scores = {"target_logprob": float(lm.score_targets(np.concatenate([before, suffix]), after[None],
                                                            target)[0]) / len(target)
                  if len(after) else float(lm.score_targets(before, suffix[None], target)[0]) / len(target)}
        request = np.concatenate([lanes["goal"][i][lanes["goal_valid"][i]], suffix])[None]
        for n, (weight, scorer) in enumerate(extras):
            name = f"{type(scorer).__name__}_{n}"
            scores[name] = float(scorer(jnp.asarray(request), jnp.ones(request.shape, bool))[0])
        nan_at = {int(j - rows[0]): int(result.failed_at[j]) for j in rows if result.failed_at[j] >= 0}
        row = {
            "behavior": bh.goal, "target": bh.target,
            "prompt": tok.decode(prompt_ids.tolist(), skip_special_tokens=True),
            "suffix": tok.decode(suffix.tolist()), "suffix_ids": suffix.tolist(),
            "success": greedy[:len(target)] == target.tolist(),
            "loss": float(state.best_loss[r]), "steps": int(result.steps[r]),
            "seconds": round(float(result.seconds[r]), 3),
            "greedy_output": tok.decode(greedy), "restart": int(r - rows[0]),
            "restart_losses": [float(state.best_loss[j]) for j in rows],
            "restart_suffix_ids": [state.best[j].tolist() for j in rows],
            "candidates_evaluated": int(state.n_evals[rows].sum()), "scores": scores,
            "nan_restarts": nan_at,
        }
        if len(nan_at) == restarts:   # nothing was searched: not a sign the model resisted
            row["error"] = f"every restart turned NaN (first at step {min(nan_at.values())}); no search result"
        out.append(row)
    return out
