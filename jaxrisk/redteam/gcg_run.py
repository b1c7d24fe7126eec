"""GCG over a group of behaviours: one engine run of behaviours x restarts lanes (two with a warm start), one row
per behaviour."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import InputError
from jaxrisk.redteam.config import GCGConfig
from jaxrisk.redteam.lanes import encode_behaviors
from jaxrisk.redteam.problem import GCGProblem, RoundTrip, allowed_tokens, word_start_tokens
from jaxrisk.scorers.lm import SequenceScorer
from jaxrisk.search import engine
from jaxrisk.search.config import RunConfig
from jaxrisk.search.reduce import best_per_group


def init_suffix(tokenizer, cfg: GCGConfig) -> np.ndarray:
    ids = tokenizer(" ".join([cfg.init_token] * cfg.suffix_len), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"init token {cfg.init_token!r} encodes to nothing")
    ids = (ids * cfg.suffix_len)[:cfg.suffix_len]
    return np.asarray(ids, np.int32)


def target_start(tokenizer, target: str, suffix0: np.ndarray) -> np.ndarray:
    """A start suffix that ends with the target's text, repeated to fill it (the rest: the initial suffix): the
    prompt then already holds what the model should say, for it to copy; falls back to `suffix0` where that
    text does not survive decode / encode."""
    ls = len(suffix0)
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids or len(ids) > ls:
        return suffix0
    reps = ls // len(ids)
    start = np.concatenate([suffix0[:ls - reps * len(ids)], np.tile(ids, reps)]).astype(np.int32)
    return start if RoundTrip(tokenizer)(start[None])[0] else suffix0


def check_roundtrip(tokenizer, suffix: np.ndarray) -> None:
    if not RoundTrip(tokenizer)(suffix[None])[0]:
        text = tokenizer.decode(suffix.tolist())
        raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} cannot round-trip the initial "
                         f"suffix {text!r} (decode then encode gives other ids); pick another init token or "
                         "run without the re-tokenisation filter")


def warm_dir(checkpoint_dir):
    """Where a group's warm-started second round keeps its engine checkpoint (beside the first round's)."""
    return None if checkpoint_dir is None else Path(f"{checkpoint_dir}-warm")


def _middles(suffixes: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Suffixes [n, Ls] followed by the template tail: what sits between the prompt and the target."""
    return np.concatenate([suffixes, np.broadcast_to(after, (len(suffixes), len(after)))], 1).astype(np.int32)


def _warm_starts(lm, lanes: dict, after: np.ndarray, best: np.ndarray, solved: np.ndarray, unsolved: np.ndarray):
    """For each unsolved lane: the suffix, among its own best and every solved lane's, that gives its target the
    highest log-probability, and the lane it came from (I-GCG's easy-to-hard initialisation, chosen per lane)."""
    pool = np.concatenate([best[solved], np.zeros((1, best.shape[1]), best.dtype)])
    starts, sources = [], []
    for j in unsolved:
        pool[-1] = best[j]
        before = lanes["before"][j][lanes["before_valid"][j]]
        target = lanes["target"][j][lanes["target_valid"][j]]
        k = int(np.argmax(lm.score_targets(before, _middles(pool, after), target)))
        starts.append(pool[k].copy())
        sources.append(int(solved[k]) if k < len(solved) else int(j))
    return np.stack(starts).astype(np.int32), np.asarray(sources)


def _search(lm, problem: GCGProblem, lane_inputs: dict, after: np.ndarray, cfg: GCGConfig, run_cfg: RunConfig):
    """Every lane's outcome (numpy, one row per lane; lanes behaviour-major, `run_cfg.restarts` each): one engine
    run, or with a warm start two (the lanes of behaviours no restart solved go on for the rest of the budget from
    the best-scoring suffix, their own best if none that solved another behaviour scores higher, with their buffer
    and filter of evaluated suffixes; a lane keeps round one's result where round two did not beat it)."""
    first = cfg.warm_start_step if 0 < cfg.warm_start_step < run_cfg.max_steps else run_cfg.max_steps
    problem = problem.replace(filter_steps=run_cfg.max_steps)   # one filter of evaluated suffixes for both rounds
    result = engine.run(problem.replace(max_steps=first), lane_inputs, run_cfg.replace(max_steps=first), desc="gcg")
    state = result.state
    out = dict(best=state.best.copy(), best_loss=state.best_loss.copy(), success=state.success.copy(),
               n_evals=state.n_evals.astype(np.int64), steps=result.steps.astype(np.int64),
               seconds=np.asarray(result.seconds, float), failed_at=result.failed_at.copy(),
               warm_from=np.full(len(state.success), -1), restarts=state.restarts.astype(np.int64))
    behaviour_solved = np.repeat(state.success.reshape(-1, run_cfg.restarts).any(1), run_cfg.restarts)
    solved, unsolved = np.flatnonzero(state.success), np.flatnonzero(~behaviour_solved & (result.failed_at < 0))
    if first == run_cfg.max_steps or not len(unsolved):
        return out
    starts, sources = _warm_starts(lm, lane_inputs, after, state.best, solved, unsolved)
    rest = run_cfg.max_steps - first
    carried = {name: getattr(state, name)[unsolved] for name in problem.CARRIED}
    items = {k: v[unsolved] for k, v in lane_inputs.items()} | carried | {"start": starts}
    second = engine.run(problem.replace(max_steps=rest), items,
                        run_cfg.replace(max_steps=rest, checkpoint_dir=warm_dir(run_cfg.checkpoint_dir)),
                        desc="gcg warm start")
    st = second.state
    took = st.success | (st.best_loss < out["best_loss"][unsolved])
    for name in ("best", "best_loss", "success"):
        out[name][unsolved[took]] = getattr(st, name)[took]
    out["warm_from"][unsolved] = np.where(sources != unsolved, sources, -1)
    out["n_evals"][unsolved] += st.n_evals
    out["restarts"][unsolved] += st.restarts
    out["steps"][unsolved] += second.steps
    out["seconds"][unsolved] = np.nanmax(out["seconds"]) + second.seconds
    out["failed_at"][unsolved] = np.where(second.failed_at >= 0, first + second.failed_at, -1)
    return out


def _weight_grid(weight_grid, extras) -> np.ndarray | None:
    if weight_grid is None:
        return None
    grid = np.asarray(weight_grid, np.float32)
    if grid.ndim != 2 or grid.shape[1] != len(extras) or not len(grid) or not np.isfinite(grid).all():
        raise InputError(f"weight_grid: expected finite weights [settings, {len(extras)}] (one per extra scorer), "
                         f"got shape {grid.shape}")
    return grid


def _same_scorer(scorer, extras) -> int | None:
    """The index of the extra that scores as `scorer` does (same class, model and BOS), if any."""
    if scorer is None:
        return None
    for n, (_, extra) in enumerate(extras):
        if (type(extra) is type(scorer) and extra.graphdef == scorer.graphdef and extra.params is scorer.params
                and np.array_equal(np.asarray(extra.bos), np.asarray(scorer.bos))):
            return n
    return None


def run_group(lm, behaviors: list[Behavior], cfg: GCGConfig, run_cfg: RunConfig, *, extras=(),
              source: str = "behaviours", system_prompt: str | None = None, weight_grid=None) -> list[dict]:
    """GCG for these behaviours x `run_cfg.restarts` in one engine run (two with a warm start); one result dict
    per behaviour (its best restart). `weight_grid` [W, E] sweeps the extras' weights as lanes of the same program:
    behaviours x W x restarts lanes, one row per behaviour and setting (behaviour-major), which carries its
    `extra_weights`."""
    tok = lm.tokenizer
    restarts = run_cfg.restarts
    grid = _weight_grid(weight_grid, extras)
    settings = 1 if grid is None else len(grid)
    lanes, after = encode_behaviors(lm, behaviors, cfg.suffix_len, source, system_prompt)
    suffix0 = init_suffix(tok, cfg)
    if cfg.filter_retokenization:
        check_roundtrip(tok, suffix0)
    allowed = allowed_tokens(tok, lm.cfg.vocab_size, cfg.allow_non_ascii)
    if allowed.sum() < cfg.topk:
        raise InputError(f"only {int(allowed.sum())} tokens are allowed, fewer than topk={cfg.topk}")
    if cfg.probe_layers >= lm.cfg.n_layers:
        raise InputError(f"GCGConfig.probe_layers: the draft must be fewer layers than the model's "
                         f"{lm.cfg.n_layers}, got {cfg.probe_layers}")
    plausibility = SequenceScorer.of(lm) if cfg.max_perplexity is not None else None
    problem = GCGProblem(params=lm.params, after=jnp.asarray(after), allowed=jnp.asarray(allowed),
                         init_suffix=jnp.asarray(suffix0), graphdef=lm.graphdef, cfg=cfg,
                         roundtrip=RoundTrip(tok) if cfg.filter_retokenization else None, extras=tuple(extras),
                         restart_allowed=jnp.asarray(word_start_tokens(tok, allowed)) if cfg.restart_noise else None,
                         plausibility=plausibility, plausibility_extra=_same_scorer(plausibility, extras),
                         max_steps=run_cfg.max_steps)
    lane_inputs = {k: np.repeat(v, settings * restarts, axis=0) for k, v in lanes.items()}   # behaviour-major
    if cfg.init_from_target:
        starts = np.stack([target_start(tok, b.target, suffix0) for b in behaviors])
        lane_inputs["start"] = np.repeat(starts, settings * restarts, axis=0)
    if grid is not None:
        lane_inputs["extra_weights"] = np.tile(np.repeat(grid, restarts, axis=0), (len(behaviors), 1))
    found = _search(lm, problem, lane_inputs, after, cfg, run_cfg)
    groups = [np.arange(g * restarts, (g + 1) * restarts) for g in range(len(behaviors) * settings)]
    best = best_per_group(groups, lambda r: (not found["success"][r], float(found["best_loss"][r])))
    out = []
    for g, (rows, r) in enumerate(zip(groups, best)):
        i, r = g // settings, int(r)
        bh = behaviors[i]
        suffix = found["best"][r]
        before = lanes["before"][i][lanes["before_valid"][i]]
        target = lanes["target"][i][lanes["target_valid"][i]]
        prompt_ids = np.concatenate([before, suffix, after]).astype(np.int32)
        greedy = lm.generate([prompt_ids], max_new_tokens=len(target))[0]
        scores = {"target_logprob": float(lm.score_targets(before, _middles(suffix[None], after), target)[0])
                  / len(target)}
        request = np.concatenate([lanes["goal"][i][lanes["goal_valid"][i]], suffix])[None]
        if problem.plausibility is not None:   # what the perplexity filter bounds
            scores["request_logprob"] = float(problem.plausibility(jnp.asarray(request),
                                                                   jnp.ones(request.shape, bool))[0])
        for n, (weight, scorer) in enumerate(extras):
            name = f"{type(scorer).__name__}_{n}"
            scores[name] = float(scorer(jnp.asarray(request), jnp.ones(request.shape, bool))[0])
        failed_at = found["failed_at"]
        nan_at = {int(j - rows[0]): int(failed_at[j]) for j in rows if failed_at[j] >= 0}
        row = {
            "behavior": bh.goal, "target": bh.target,
            "prompt": tok.decode(prompt_ids.tolist(), skip_special_tokens=True),
            "suffix": tok.decode(suffix.tolist()), "suffix_ids": suffix.tolist(),
            "success": greedy[:len(target)] == target.tolist(),
            "loss": float(found["best_loss"][r]), "steps": int(found["steps"][r]),
            "seconds": round(float(found["seconds"][r]), 3),
            "greedy_output": tok.decode(greedy), "restart": int(r - rows[0]),
            "restart_losses": [float(found["best_loss"][j]) for j in rows],
            "restart_suffix_ids": [found["best"][j].tolist() for j in rows],
            "candidates_evaluated": int(found["n_evals"][rows].sum()), "scores": scores,
            "nan_restarts": nan_at,
        }
        if grid is not None:
            row["extra_weights"] = grid[g % settings].tolist()
        if cfg.restart_patience:   # how often the reported lane went back to its start suffix
            row["stall_restarts"] = int(found["restarts"][r])
        if cfg.warm_start_step:   # which behaviour's solved suffix this one went on from (None: its own)
            source_lane = int(found["warm_from"][r])
            row["warm_start_from"] = (behaviors[source_lane // (settings * restarts)].goal if source_lane >= 0
                                      else None)
        if len(nan_at) == restarts:   # nothing was searched: not a sign the model resisted
            row["error"] = f"every restart turned NaN (first at step {min(nan_at.values())}); no search result"
        out.append(row)
    return out
