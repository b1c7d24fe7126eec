"""Red-teaming with ARCA: per behaviour, a joint search for a request x and the output o it elicits.

`run_arca(lm, behaviors, config)` is what `redteam.run` calls for `RedteamConfig(method="arca")`. One lane
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
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import MAX_SEED, InputError, require_int
from jaxrisk.redteam.arca import ARCAProblem
from jaxrisk.redteam.config import ARCAConfig, GCGConfig, RedteamConfig
from jaxrisk.redteam.problem import allowed_tokens
from jaxrisk.redteam.report import RedteamResult, read_results, run_settings, write_results
from jaxrisk.redteam.run import _group_checkpoints, encode_behaviors
from jaxrisk.search import engine
from jaxrisk.search.config import RunConfig
from jaxrisk.search.reduce import best_per_group

EXTRA_ROLES = ("plausibility", "danger")


def _check_extras(extras) -> tuple:
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


def encode_arca(lm, behaviors: list[Behavior], cfg: ARCAConfig, source: str = "behaviours"):
    """GCG's lanes (before = the prefix, left-padded; goal; target) and the template tail, checked to fit
    the context both for the search (prefix + x + after + o) and for the success check (... + target)."""
    lanes, after = encode_behaviors(lm, behaviors, GCGConfig(suffix_len=cfg.request_len), source)
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
                   source: str = "behaviours") -> list[dict]:
    """ARCA for these behaviours x `run_cfg.restarts` in one engine run; one result dict per behaviour
    (its restart with the highest objective)."""
    tok = lm.tokenizer
    extras = _check_extras(extras)
    restarts = run_cfg.restarts
    lx, lo = cfg.request_len, cfg.output_len
    lanes, after = encode_arca(lm, behaviors, cfg, source)
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
    stamps = [(0, time.perf_counter())]
    t0 = stamps[0][1]
    result = engine.run(problem, lane_inputs, run_cfg, desc="arca",
                        on_chunk=lambda step, info: stamps.append((step, time.perf_counter())))
    state = result.state

    def seconds_at(step: int) -> float:  # wall time when the chunk holding `step` ended (this process)
        return next((t - t0 for s, t in stamps if s >= step), stamps[-1][1] - t0)

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
            "seconds": round(seconds_at(int(result.steps[r])), 3),
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


def run_arca(lm, behaviors: list[Behavior], config: RedteamConfig, *, out_dir: str | Path | None = None,
             extras=(), source: str = "behaviours") -> RedteamResult:
    """ARCA over every behaviour; with `out_dir`, resume a killed run there and keep OUT/results.jsonl current
    after every group.

    `extras` are `redteam.run`'s ((weight, scorer), ...) pairs, given roles by position:
    extras[0] is the plausibility scorer, applied to the request x (token ids or one-hot [B, Lx]);
    extras[1] is the danger scorer, applied to the output o ([B, Lo]). More than two is an InputError.
    Each term enters the objective with weight `config.arca.plausibility_weight` (resp. `danger_weight`)
    times the pair's own weight, so pass 1.0 in the pair to have config.arca's weight alone.

    Rows carry GCG's keys (suffix / suffix_ids = the request x; success = the greedy continuation of
    prefix + x + after starts with the target's tokens; loss = -objective; restart_losses = -objective per
    restart) plus method="arca", request, output (decoded x and o), output_ids, objective, consistent (o is
    the model's greedy continuation, teacher-forced) and scores (output_logprob = log p(o | prompt), and the
    unweighted plausibility / danger scores).
    """
    extras = _check_extras(extras)
    run_cfg = config.run
    require_int("RunConfig.seed", run_cfg.seed, 0, MAX_SEED - len(behaviors))   # each group's seed is offset
    settings = run_settings(lm, config, extras)
    path = Path(out_dir) / "results.jsonl" if out_dir is not None else None
    done = read_results(path, settings) if path is not None and path.exists() else []
    finished = {(r["behavior"], r["target"]) for r in done}
    todo = [b for b in behaviors if (b.goal, b.target) not in finished]
    if todo:
        encode_arca(lm, todo, config.arca, source)  # every bad behaviour is reported before any work starts
    root = Path(out_dir) / "checkpoint" if out_dir is not None else None
    if root is not None:
        _group_checkpoints(root, len(done))
    for g in range(0, len(todo), config.group):
        chunk = todo[g:g + config.group]
        ckpt = root / f"group-{len(done)}" if root is not None else None
        group_cfg = run_cfg.replace(seed=run_cfg.seed + len(done), checkpoint_dir=ckpt)
        rows = run_arca_group(lm, chunk, config.arca, group_cfg, extras=extras, source=source)
        done.extend(dict(row, run=settings) for row in rows)
        if path is not None:
            write_results(path, done)
            engine.remove_checkpoint(ckpt)
    if root is not None and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return RedteamResult(done)
