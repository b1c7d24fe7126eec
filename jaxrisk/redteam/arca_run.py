"""Red-teaming with ARCA: per behaviour, a joint search for a request x and the output o it elicits.

`redteam.run` searches with `run_arca_group` for `RedteamConfig(method="arca")`. One lane
= one behaviour x one restart; `config.group` behaviours x `config.run.restarts` lanes share one engine run.
Per behaviour the model reads

    prefix + x + after + o

prefix = BOS + the chat template's head + the goal (left-padded across the group), x = `arca.request_len`
free tokens appended after the goal like a GCG suffix (random allowed tokens at the start of each restart),
after = the chat template's tail (empty for base models), o = `arca.output_len` free tokens that start as
the target's first tokens (random where the target is shorter). Coordinate ascent (see `ARCAProblem`)
maximises f = log p(o | prefix, x, after) + plausibility and danger terms; the restart with the highest f
is reported. With `out_dir` the run is resumable exactly like GCG's: OUT/results.jsonl is rewritten
atomically after each group, finished behaviours are skipped, and an interrupted group continues from
OUT/checkpoint/group-K.

Rows carry GCG's keys (suffix / suffix_ids = the request x; success = the greedy continuation of prefix + x +
after starts with the target's tokens; loss = -objective; restart_losses = -objective per restart) plus
method="arca", request, output (decoded x and o), output_ids, objective, consistent (o is the model's greedy
continuation, teacher-forced) and scores (output_logprob = log p(o | prompt), and the unweighted plausibility
/ danger scores).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import InputError
from jaxrisk.redteam.arca import ARCAProblem
from jaxrisk.redteam.config import ARCAConfig
from jaxrisk.redteam.problem import allowed_tokens
from jaxrisk.redteam.lanes import encode_behaviors
from jaxrisk.search import engine
from jaxrisk.search.config import RunConfig
from jaxrisk.search.reduce import best_per_group

EXTRA_ROLES = ("plausibility", "danger")


def check_extras(extras) -> tuple:
    """`redteam.run`'s ((weight, scorer), ...) pairs, given roles by position: extras[0] is the plausibility
    scorer, applied to the request x (token ids or one-hot [B, Lx]); extras[1] the danger scorer, applied to
    the output o ([B, Lo]). Each term's weight is `config.arca.plausibility_weight` (resp. `danger_weight`)
    times the pair's own weight: pass 1.0 in the pair to have config.arca's weight alone."""
    extras = tuple(extras)
    if len(extras) > len(EXTRA_ROLES):
        raise InputError(f"ARCA takes at most {len(EXTRA_ROLES)} extra scorers (a plausibility scorer of the "
                         f"request, then a danger scorer of the output); got {len(extras)}")
    for role, pair in zip(EXTRA_ROLES, extras):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], numbers.Real)
                and callable(pair[1])):
            raise InputError(f"ARCA {role} extra: expected a (weight, scorer) pair, got {pair!r}")
    return extras


def _effective_config(cfg: ARCAConfig, extras: tuple) -> ARCAConfig:
    """config.arca with each term's weight multiplied by its extra's own weight."""
    weights = {f"{role}_weight": getattr(cfg, f"{role}_weight") * float(w)
               for role, (w, _) in zip(EXTRA_ROLES, extras)}
    return dataclasses.replace(cfg, **weights)


def encode_arca(lm, behaviors: list[Behavior], cfg: ARCAConfig, source: str = "behaviours",
                system_prompt: str | None = None):
    """GCG's lanes (before = the prefix, left-padded; goal; target) and the template tail, checked to fit
    the context both for the search (prefix + x + after + o) and for the success check (... + target)."""
    lanes, after = encode_behaviors(lm, behaviors, cfg.request_len, source, system_prompt)
    for bh, valid in zip(behaviors, lanes["before_valid"]):
        total = int(valid.sum()) + cfg.request_len + len(after) + cfg.output_len
        if total > lm.cfg.max_position:
            raise InputError(f"{source}:{bh.line}: prompt + request + output is {total} tokens, longer than the "
                             f"model's context of {lm.cfg.max_position}")
    return lanes, after


def _greedy(lm, prompts, targets) -> list[list[int]]:
    """The greedy continuation of each prompt, as long as its target: one left-padded batch when the longest
    prompt and target fit the context together, else one prompt at a time."""
    n = max(len(t) for t in targets)
    if max(len(p) for p in prompts) + n <= lm.cfg.max_position:
        return [g[:len(t)] for g, t in zip(lm.generate(prompts, max_new_tokens=n), targets)]
    return [lm.generate([p], max_new_tokens=len(t))[0] for p, t in zip(prompts, targets)]


def run_arca_group(lm, behaviors: list[Behavior], cfg: ARCAConfig, run_cfg: RunConfig, *, extras=(),
                   source: str = "behaviours", system_prompt: str | None = None) -> list[dict]:
    """ARCA for these behaviours x `run_cfg.restarts` in one engine run; one result dict per behaviour
    (its restart with the highest objective)."""
    tok = lm.tokenizer
    extras = check_extras(extras)
    restarts = run_cfg.restarts
    lx, lo = cfg.request_len, cfg.output_len
    lanes, after = encode_arca(lm, behaviors, cfg, source, system_prompt)
    allowed = allowed_tokens(tok, lm.cfg.vocab_size)
    if allowed.sum() < cfg.candidates:
        raise InputError(f"only {int(allowed.sum())} tokens are allowed, fewer than ARCA's "
                         f"candidates={cfg.candidates}")
    scorers = dict(zip(EXTRA_ROLES, (scorer for _, scorer in extras)))
    problem = ARCAProblem(params=lm.params, allowed=jnp.asarray(allowed), graphdef=lm.graphdef,
                          cfg=_effective_config(cfg, extras), after=jnp.asarray(after), **scorers)
    o0 = np.full((len(behaviors), lo), -1, np.int32)
    for i, (t, v) in enumerate(zip(lanes["target"], lanes["target_valid"])):
        first = t[v][:lo]
        o0[i, :len(first)] = first
    per_behavior = {"prefix": lanes["before"], "prefix_valid": lanes["before_valid"],
                    "x0": np.full((len(behaviors), lx), -1, np.int32), "o0": o0}
    lane_inputs = {k: np.repeat(v, restarts, axis=0) for k, v in per_behavior.items()}   # behaviour-major
    result = engine.run(problem, lane_inputs, run_cfg, desc="arca")
    state = result.state

    groups = [np.arange(i * restarts, (i + 1) * restarts) for i in range(len(behaviors))]
    best = [int(r) for r in best_per_group(groups, lambda r: -float(state.objective[r]))]
    # the reported pairs' unweighted terms, all behaviours in one compiled call
    scores_fn = jax.jit(jax.vmap(lambda p, prefix, valid, z: p.scores(prefix, z[None], valid), in_axes=(None, 0, 0, 0)))
    terms = jax.device_get(scores_fn(problem, lanes["before"], lanes["before_valid"],
                                     np.concatenate([state.x[best], state.o[best]], 1)))
    prefixes = [b[v] for b, v in zip(lanes["before"], lanes["before_valid"])]
    targets = [t[v] for t, v in zip(lanes["target"], lanes["target_valid"])]
    prompts = [np.concatenate([p, state.x[r], after]).astype(np.int32) for p, r in zip(prefixes, best)]
    greedy = _greedy(lm, prompts, targets)
    out = []
    for i, (bh, rows, r) in enumerate(zip(behaviors, groups, best)):
        x, o = state.x[r].astype(np.int32), state.o[r].astype(np.int32)
        target, prompt_ids = targets[i], prompts[i]
        scores = {k: float(v[i, 0]) for k, v in terms.items() if k != "consistent"}
        objective = float(state.objective[r])
        nan_at = {int(j - rows[0]): int(result.failed_at[j]) for j in rows if result.failed_at[j] >= 0}
        row = {
            "method": "arca", "behavior": bh.goal, "target": bh.target,
            "prompt": tok.decode(prompt_ids.tolist(), skip_special_tokens=True),
            "request": tok.decode(x.tolist()), "output": tok.decode(o.tolist()),
            "suffix": tok.decode(x.tolist()), "suffix_ids": x.tolist(), "output_ids": o.tolist(),
            "objective": objective, "consistent": bool(state.consistent[r]),
            "success": greedy[i] == target.tolist(),
            "loss": -objective, "steps": int(result.steps[r]),
            "seconds": round(float(result.seconds[r]), 3),
            "greedy_output": tok.decode(greedy[i]), "restart": int(r - rows[0]),
            "restart_losses": [-float(state.objective[j]) for j in rows],
            "restart_suffix_ids": [state.x[j].tolist() for j in rows],
            "restart_output_ids": [state.o[j].tolist() for j in rows],
            "scores": scores, "nan_restarts": nan_at,
        }
        if len(nan_at) == restarts:   # nothing was searched: not a sign the model resisted
            row["error"] = f"every restart turned NaN (first at step {min(nan_at.values())}); no search result"
        out.append(row)
    return out
