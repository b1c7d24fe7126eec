"""`jaxrisk redteam`: GCG over a behaviour file, many behaviours x restarts per compiled program.

Behaviours are processed in groups (`group` behaviours x `restarts` lanes in one
engine run). After each group, `results.jsonl` is rewritten atomically with
every finished behaviour; a killed run resumes: finished behaviours are
skipped and the interrupted group continues from its engine checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxrisk.data.prompts import Behavior
from jaxrisk.data.text import jsonl_rows
from jaxrisk.errors import MAX_SEED, InputError, require_int
from jaxrisk.io import atomic_write, json_text
from jaxrisk.scorers.probe import pad_batch
from jaxrisk.search import engine
from jaxrisk.search.gcg import GCGConfig, GCGProblem, RoundTrip, allowed_tokens

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


def run_group(lm, behaviors: list[Behavior], cfg: GCGConfig, *, restarts: int, max_steps: int, seed: int,
              extras=(), n_devices=None, checkpoint_dir=None, progress=True, chunk_steps: int = 10,
              source: str = "behaviours") -> list[dict]:
    """GCG for these behaviours x restarts in one engine run; one result dict per behaviour (best restart)."""
    tok = lm.tokenizer
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
    stamps = [(0, time.perf_counter())]
    t0 = stamps[0][1]
    result = engine.run(problem, lane_inputs, seed,
                        engine.EngineConfig(max_steps=max_steps, chunk_steps=chunk_steps, n_devices=n_devices,
                                            checkpoint_dir=checkpoint_dir, progress=progress, desc="gcg"),
                        on_chunk=lambda step, info: stamps.append((step, time.perf_counter())))
    state = result.state

    def seconds_at(step: int) -> float:  # wall time when the chunk holding `step` ended (this process)
        return next((t - t0 for s, t in stamps if s >= step), stamps[-1][1] - t0)

    out = []
    for i, bh in enumerate(behaviors):
        rows = np.arange(i * restarts, (i + 1) * restarts)
        order = sorted(rows, key=lambda r: (not state["success"][r], float(state["best_loss"][r])))
        r = int(order[0])
        suffix = state["best"][r]
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
            "loss": float(state["best_loss"][r]), "steps": int(result.steps[r]),
            "seconds": round(seconds_at(int(result.steps[r])), 3),
            "greedy_output": tok.decode(greedy), "restart": int(r - rows[0]),
            "restart_losses": [float(state["best_loss"][j]) for j in rows],
            "restart_suffix_ids": [state["best"][j].tolist() for j in rows],
            "candidates_evaluated": int(state["n_evals"][rows].sum()), "scores": scores,
            "nan_restarts": nan_at,
        }
        if len(nan_at) == restarts:   # nothing was searched: not a sign the model resisted
            row["error"] = f"every restart turned NaN (first at step {min(nan_at.values())}); no search result"
        out.append(row)
    return out


RESULT_KEYS = ("behavior", "target", "prompt", "suffix_ids", "success", "run")
_GROUP_DIR = re.compile(r"group-\d+")


def run_settings(lm, cfg: GCGConfig, *, restarts: int, max_steps: int, seed: int, extras=()) -> dict:
    """What makes two redteam runs the same run: each result row carries it, and a resume checks it."""
    return {"model": str(Path(lm.path).resolve()) if lm.path else None, "gcg": dataclasses.asdict(cfg), "restarts": restarts,
            "max_steps": max_steps, "seed": seed,
            "extras": [[float(w), type(scorer).__name__] for w, scorer in extras]}


def write_results(path: Path, rows: list[dict]) -> None:
    text = "".join(json_text(r) + "\n" for r in rows)
    atomic_write(path, lambda f: f.write(text))


def read_results(path: Path, settings: dict) -> list[dict]:
    """The rows of an earlier run's results.jsonl, each checked to be one this same run wrote."""
    rows = []
    for n, row in jsonl_rows(path, "a result row written by jaxrisk redteam"):
        missing = [k for k in RESULT_KEYS if k not in row]
        if missing or not all(isinstance(row[k], str) for k in ("behavior", "target")):
            raise InputError(f"{path}:{n}: not a result row written by jaxrisk redteam (missing or non-text "
                             f"{', '.join(missing) or 'behavior/target'}); move the file away or choose another --out")
        if row["run"] != settings:
            changed = sorted(k for k in settings if row["run"].get(k) != settings[k]) if isinstance(row["run"], dict) \
                else ["all"]
            raise InputError(f"{path}:{n}: a result of a different run (other {', '.join(changed)}); resuming would mix "
                             "the two: choose another --out or move the file away")
        rows.append(row)
    return rows


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


def redteam(lm, behaviors: list[Behavior], out: str | Path, cfg: GCGConfig = GCGConfig(), *, restarts: int = 1,
            max_steps: int = 250, group: int = 8, seed: int = 0, extras=(), n_devices=None, progress=True,
            source: str = "behaviours") -> list[dict]:
    """Run every behaviour (resuming a killed run in `out`); returns and writes OUT/results.jsonl."""
    for name, value in (("restarts", restarts), ("max_steps", max_steps), ("group", group)):
        require_int(f"redteam {name}", value, 1)
    require_int("redteam seed", seed, 0, MAX_SEED - len(behaviors))   # each group's seed is offset by its position
    out = Path(out)
    path = out / "results.jsonl"
    settings = run_settings(lm, cfg, restarts=restarts, max_steps=max_steps, seed=seed, extras=extras)
    done = read_results(path, settings) if path.exists() else []
    finished = {(r["behavior"], r["target"]) for r in done}
    todo = [b for b in behaviors if (b.goal, b.target) not in finished]
    if todo:
        encode_behaviors(lm, todo, cfg, source)  # every bad behaviour is reported before any work starts
    root = out / "checkpoint"
    _group_checkpoints(root, len(done))
    for g in range(0, len(todo), group):
        chunk = todo[g:g + group]
        ckpt = root / f"group-{len(done)}"
        rows = run_group(lm, chunk, cfg, restarts=restarts, max_steps=max_steps, seed=seed + len(done),
                         extras=extras, n_devices=n_devices, checkpoint_dir=ckpt, progress=progress, source=source)
        done.extend(dict(row, run=settings) for row in rows)
        write_results(path, done)
        engine.remove_checkpoint(ckpt)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return done
