"""Red-teaming a language model: GCG over behaviours, many behaviours x restarts per compiled program.

`run(lm, behaviors, config, out_dir=...) -> RedteamResult` is the Python API; `jaxrisk redteam`
wraps it. Behaviours are processed in groups (`config.group` behaviours x `config.run.restarts`
lanes in one engine run). With `out_dir`, after each group `results.jsonl` is rewritten atomically
with every finished behaviour; a killed run resumes: finished behaviours are skipped and the
interrupted group continues from its engine checkpoint (`out_dir/checkpoint/group-K`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxrisk.data.batch import pad_batch
from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import MAX_SEED, InputError, require_int
from jaxrisk.redteam.config import GCGConfig, RedteamConfig
from jaxrisk.redteam.problem import GCGProblem, RoundTrip, allowed_tokens
from jaxrisk.redteam.report import RedteamResult, read_results, run_settings, write_results
from jaxrisk.search import engine
from jaxrisk.search.config import RunConfig
from jaxrisk.search.reduce import best_per_group

OPTIM = "{optim_str}"


def split_template(tokenizer, goal: str) -> tuple[str, str]:
    """(text before the suffix, text after it). Chat models: their chat template; base models: 'goal '."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{goal} {OPTIM}"}], tokenize=False,
                                             add_generation_prompt=True)
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]  # added again when tokenising
        before, after = text.split(OPTIM)
        return before, after
    return goal, ""


def init_suffix(tokenizer, cfg: GCGConfig) -> np.ndarray:
    ids = tokenizer(" ".join([cfg.init_token] * cfg.suffix_len), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"init token {cfg.init_token!r} encodes to nothing")
    ids = (ids * cfg.suffix_len)[:cfg.suffix_len]
    return np.asarray(ids, np.int32)


def encode_behaviors(lm, behaviors: list[Behavior], cfg: GCGConfig, source: str = "behaviours"):
    """Token lanes for each behaviour (one row each) and the shared template tail; checks the context."""
    tok = lm.tokenizer
    befores, goals, targets, afters = [], [], [], set()
    for bh in behaviors:
        before, after = split_template(tok, bh.goal)
        afters.add(after)
        befores.append(tok(before)["input_ids"])
        goals.append(tok(bh.goal, add_special_tokens=False)["input_ids"])
        target = tok(bh.target, add_special_tokens=False)["input_ids"]
        targets.append(target)
    if len(afters) != 1:
        raise InputError(f"{source}: the chat template puts different text after each goal; not supported")
    after_ids = tok(afters.pop(), add_special_tokens=False)["input_ids"] if afters else []
    for bh, b, t in zip(behaviors, befores, targets):
        total = len(b) + cfg.suffix_len + len(after_ids) + len(t)
        if total > lm.cfg.max_position:
            raise InputError(f"{source}:{bh.line}: prompt + suffix + target is {total} tokens, longer than the "
                             f"model's context of {lm.cfg.max_position}")
    for bh, *ids in zip(behaviors, befores, goals, targets):
        for part in ids + [after_ids]:   # a tokenizer with added tokens can emit ids the embedding lacks
            lm.check_tokens(np.asarray(part, np.int64), f"{source}:{bh.line}: tokens", ndim=1, context=False)
    before, before_valid = pad_batch(befores, left=True)
    goal, goal_valid = pad_batch(goals)
    target, target_valid = pad_batch(targets)
    lanes = dict(before=before, before_valid=before_valid, goal=goal, goal_valid=goal_valid,
                 target=target, target_valid=target_valid)
    return lanes, np.asarray(after_ids, np.int32)


def check_roundtrip(tokenizer, suffix: np.ndarray) -> None:
    if not RoundTrip(tokenizer)(suffix[None])[0]:
        text = tokenizer.decode(suffix.tolist())
        raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} cannot round-trip the initial "
                         f"suffix {text!r} (decode then encode gives other ids); pick another init token or "
                         "run without the re-tokenisation filter")


def timed_engine_run(problem, lane_inputs, run_cfg: RunConfig, desc: str):
    """`engine.run`, and `seconds_at(step)`: the wall time (this process) when the chunk holding `step` ended,
    so each row can say when its lane stopped."""
    stamps = [(0, time.perf_counter())]
    result = engine.run(problem, lane_inputs, run_cfg, desc=desc,
                        on_chunk=lambda step, info: stamps.append((step, time.perf_counter())))
    t0 = stamps[0][1]

    def seconds_at(step: int) -> float:
        return next((t - t0 for s, t in stamps if s >= step), stamps[-1][1] - t0)

    return result, seconds_at


def run_group(lm, behaviors: list[Behavior], cfg: GCGConfig, run_cfg: RunConfig, *, extras=(),
              source: str = "behaviours") -> list[dict]:
    """GCG for these behaviours x `run_cfg.restarts` in one engine run; one result dict per behaviour
    (its best restart)."""
    tok = lm.tokenizer
    restarts = run_cfg.restarts
    lanes, after = encode_behaviors(lm, behaviors, cfg, source)
    suffix0 = init_suffix(tok, cfg)
    if cfg.filter_retokenization:
        check_roundtrip(tok, suffix0)
    allowed = allowed_tokens(tok, lm.cfg.vocab_size, cfg.allow_non_ascii)
    if allowed.sum() < cfg.topk:
        raise InputError(f"only {int(allowed.sum())} tokens are allowed, fewer than topk={cfg.topk}")
    problem = GCGProblem(params=lm.params, after=jnp.asarray(after), allowed=jnp.asarray(allowed),
                         init_suffix=jnp.asarray(suffix0), graphdef=lm.graphdef, cfg=cfg,
                         roundtrip=RoundTrip(tok) if cfg.filter_retokenization else None, extras=tuple(extras))
    lane_inputs = {k: np.repeat(v, restarts, axis=0) for k, v in lanes.items()}   # behaviour-major
    result, seconds_at = timed_engine_run(problem, lane_inputs, run_cfg, "gcg")
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
            "seconds": round(seconds_at(int(result.steps[r])), 3),
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


_GROUP_DIR = re.compile(r"group-\d+")


def _group_checkpoints(root: Path, finished: int) -> None:
    """Check OUT/checkpoint holds only group checkpoints jaxrisk wrote; drop those of groups already in the results
    (a run killed between writing a group's results and removing its checkpoint leaves one behind)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise InputError(f"{root}: exists and is not a directory (jaxrisk keeps its checkpoints there); move it away "
                         "or choose another --out")
    foreign = [p.name for p in root.iterdir() if not (_GROUP_DIR.fullmatch(p.name) and p.is_dir())]
    if foreign:
        raise InputError(f"{root}: holds files jaxrisk did not write ({', '.join(sorted(foreign)[:5])}); jaxrisk keeps "
                         "its checkpoints there and never deletes what it did not create: move them away or choose "
                         "another --out")
    for group in root.iterdir():
        if int(group.name.split("-")[1]) < finished:
            engine.remove_checkpoint(group)


def run(lm, behaviors: list[Behavior], config: RedteamConfig = RedteamConfig(), *, out_dir: str | Path | None = None,
        extras=(), source: str = "behaviours") -> RedteamResult:
    """Search every behaviour (GCG, or ARCA with `config.method="arca"`); with `out_dir`, resume a killed run
    there and keep OUT/results.jsonl current after every group. `extras`: ((weight, scorer), ...) log-scores
    added to the objective (GCG: of the request; ARCA: see `arca_run.check_extras`)."""
    if config.method == "arca":
        from jaxrisk.redteam.arca_run import check_extras, encode_arca, run_arca_group

        extras = check_extras(extras)
        check = lambda todo: encode_arca(lm, todo, config.arca, source)  # noqa: E731
        search = lambda chunk, cfg: run_arca_group(lm, chunk, config.arca, cfg, extras=extras,  # noqa: E731
                                                   source=source)
    else:
        check = lambda todo: encode_behaviors(lm, todo, config.gcg, source)  # noqa: E731
        search = lambda chunk, cfg: run_group(lm, chunk, config.gcg, cfg, extras=extras, source=source)  # noqa: E731
    run_cfg = config.run
    require_int("RunConfig.seed", run_cfg.seed, 0, MAX_SEED - len(behaviors))   # each group's seed is offset
    settings = run_settings(lm, config, extras)
    path = Path(out_dir) / "results.jsonl" if out_dir is not None else None
    done = read_results(path, settings) if path is not None and path.exists() else []
    finished = {(r["behavior"], r["target"]) for r in done}
    todo = [b for b in behaviors if (b.goal, b.target) not in finished]
    if todo:
        check(todo)   # every bad behaviour is reported before any work starts
    root = Path(out_dir) / "checkpoint" if out_dir is not None else None
    if root is not None:
        _group_checkpoints(root, len(done))
    for g in range(0, len(todo), config.group):
        ckpt = root / f"group-{len(done)}" if root is not None else None
        rows = search(todo[g:g + config.group], run_cfg.replace(seed=run_cfg.seed + len(done), checkpoint_dir=ckpt))
        done.extend(dict(row, run=settings) for row in rows)
        if path is not None:
            write_results(path, done)
            engine.remove_checkpoint(ckpt)
    if root is not None and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return RedteamResult(done)
