"""Red-teaming a language model: GCG or ARCA over behaviours, many behaviours x restarts per compiled program.

`run(lm, behaviors, config, out_dir=...) -> RedteamResult` is the Python API; `jaxrisk redteam`
wraps it. Behaviours are processed in groups (`config.group` behaviours x `config.run.restarts`
lanes in one engine run). With `out_dir`, after each group `results.jsonl` is rewritten atomically
with every finished behaviour; a killed run resumes: finished behaviours are skipped and the
interrupted group continues from its engine checkpoint (`out_dir/checkpoint/group-K`).
"""

from __future__ import annotations

import re
from pathlib import Path

from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import MAX_SEED, InputError, require_int
from jaxrisk.redteam.arca_run import check_extras, encode_arca, run_arca_group
from jaxrisk.redteam.config import RedteamConfig
from jaxrisk.redteam.gcg_run import run_group, warm_dir
from jaxrisk.redteam.lanes import encode_behaviors
from jaxrisk.redteam.report import RedteamResult, read_results, run_settings, write_results
from jaxrisk.search import engine

_GROUP_DIR = re.compile(r"group-\d+(-warm)?")   # a group's engine checkpoint (and its warm start's)


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
    system = config.system_prompt
    if config.method == "arca":
        extras = check_extras(extras)
        check = lambda todo: encode_arca(lm, todo, config.arca, source, system)  # noqa: E731
        search = lambda chunk, cfg: run_arca_group(lm, chunk, config.arca, cfg, extras=extras,  # noqa: E731
                                                   source=source, system_prompt=system)
    else:
        check = lambda todo: encode_behaviors(lm, todo, config.gcg.suffix_len, source, system)  # noqa: E731
        search = lambda chunk, cfg: run_group(lm, chunk, config.gcg, cfg, extras=extras, source=source,  # noqa: E731
                                              system_prompt=system, weight_grid=config.weight_grid)
    run_cfg = config.run
    require_int("RunConfig.seed", run_cfg.seed, 0, MAX_SEED - len(behaviors))   # each group's seed is offset
    settings = run_settings(lm, config, extras)
    path = Path(out_dir) / "results.jsonl" if out_dir is not None else None
    done = read_results(path, settings) if path is not None and path.exists() else []
    finished = {(r["behavior"], r["target"]) for r in done}
    todo = [b for b in behaviors if (b.goal, b.target) not in finished]
    if todo:
        check(todo)   # every bad behaviour is reported before any work starts
    per_behaviour = 1 if config.weight_grid is None else len(config.weight_grid)   # result rows per behaviour
    root = Path(out_dir) / "checkpoint" if out_dir is not None else None
    if root is not None:
        _group_checkpoints(root, len(done) // per_behaviour)
    for g in range(0, len(todo), config.group):
        n_done = len(done) // per_behaviour
        ckpt = root / f"group-{n_done}" if root is not None else None
        rows = search(todo[g:g + config.group], run_cfg.replace(seed=run_cfg.seed + n_done, checkpoint_dir=ckpt))
        done.extend(dict(row, run=settings) for row in rows)
        if path is not None:
            write_results(path, done)
            engine.remove_checkpoint(ckpt)
            engine.remove_checkpoint(warm_dir(ckpt))
    if root is not None and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return RedteamResult(done)
