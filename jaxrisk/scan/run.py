"""The hidden-trigger scan: invert a trigger for every class x restart at once, then decide.

`run(model, data, config) -> ScanResult` is the Python API; `jaxrisk scan` wraps it. After the inversion
come MM-BD's maximum-margin search (when configured) and the symmetry search of the suspects, each one
compiled program; `decide.py` turns their statistics into the verdict. Neural Cleanse's own rule (MAD
anomaly index above 2 among the smaller norms) is still reported beside it, and is the rule in pair mode.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrisk.data.images import ImageSet, stamp
from jaxrisk.errors import InputError
from jaxrisk.models.classifiers import logits_fn, pure_apply
from jaxrisk.models.safetensors_file import check_finite
from jaxrisk.scan.config import ScanConfig
from jaxrisk.scan.decide import (asymmetry, decide, flag_outliers, mad_anomaly_index, reference_statistics,
                                 size_statistics, suspects)
from jaxrisk.scan.margin import gamma_p_value, max_margins
from jaxrisk.scan.problem import TriggerInversion, to_mask
from jaxrisk.scan.reference import Reference
from jaxrisk.scan.report import ScanResult, per_target, verdict
from jaxrisk.search import engine
from jaxrisk.search.reduce import best_per_group, lane_groups

MARGIN_CHECKPOINT, SYMMETRY_CHECKPOINT = "max_margin", "symmetry"   # the later searches' checkpoints, nested


def remove_scan_checkpoint(directory) -> None:
    """Delete a finished scan's checkpoint: the later searches' nested ones, then the inversion's."""
    for nested in (MARGIN_CHECKPOINT, SYMMETRY_CHECKPOINT):
        engine.remove_checkpoint(Path(directory) / nested)
    engine.remove_checkpoint(directory)


def _check_images(model, data: ImageSet, weights_name: str) -> None:
    expected = tuple(model.input_shape)
    if data.images.ndim != 4 or tuple(data.images.shape[1:]) != expected:
        raise InputError(f"{data.source}: images are {'x'.join(map(str, data.images.shape[1:]))} but the model "
                         f"from {weights_name} expects {'x'.join(map(str, expected))} (C x H x W)")
    if len(data.labels) <= 1:
        raise InputError(f"{data.source}: no images to scan with")
    if len(data.labels) != len(data.images) or not np.issubdtype(data.labels.dtype, np.integer):
        raise InputError(f"{data.source}: expected one integer label per image, got {data.labels.dtype} "
                         f"labels {list(data.labels.shape)} for {len(data.images)} images")
    if not np.issubdtype(data.images.dtype, np.floating):
        raise InputError(f"{data.source}: images are {data.images.dtype}; expected floats in [0, 1] "
                         "(divide 0..255 pixels by 255)")
    lo, hi = float(np.min(data.images)), float(np.max(data.images))
    if not (0.0 <= lo and hi <= 1.0):   # also false for NaN
        raise InputError(f"{data.source}: image values span {lo:g}..{hi:g}; expected [0, 1] (divide 0..255 "
                         "pixels by 255)")


def _check_finite_params(params, weights_name: str) -> None:
    """Refuse a model whose parameters hold NaN or inf (also one built in memory, never loaded from a file):
    every search on it would fail, silently 'clean'."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        check_finite(weights_name, f"parameter {jax.tree_util.keystr(path)}", np.asarray(leaf))


def _check_all_failed(groups: dict[tuple[int, int], list[int]], failed_at: np.ndarray, weights_name: str) -> None:
    """A class (or pair) whose every restart turned NaN has no trigger estimate: no verdict can be given."""
    dead = [(key, min(int(failed_at[i]) for i in idx)) for key, idx in groups.items() if all(failed_at[idx] >= 0)]
    if dead:
        where = ", ".join(f"{'class ' if s < 0 else f'{s} -> '}{t} (first NaN at step {step})"
                          for (s, t), step in dead[:5])
        raise InputError(f"{weights_name}: every restart of {len(dead)} search(es) turned NaN: {where}; the scan "
                         "cannot give a verdict (do the model's outputs overflow on these images?)")


def _check_labels(data: ImageSet, pool_y: np.ndarray, n_classes: int, config: ScanConfig) -> None:
    if data.labels.min() < 0 or data.labels.max() >= n_classes:
        raise InputError(f"{data.source}: labels span {data.labels.min()}..{data.labels.max()} but the model has "
                         f"{n_classes} outputs")
    absent = sorted(set(range(n_classes)) - set(np.unique(pool_y).tolist()))
    if config.pairs and absent:
        raise InputError(f"{data.source}: pair mode needs images of every source class; none of class(es) {absent}")


def _lanes(n_classes: int, restarts: int, pairs: bool) -> dict[str, np.ndarray]:
    if pairs:
        combos = [(s, t) for t in range(n_classes) for s in range(n_classes) if s != t]
    else:
        combos = [(-1, t) for t in range(n_classes)]
    src = np.repeat([s for s, _ in combos], restarts).astype(np.int32)
    tgt = np.repeat([t for _, t in combos], restarts).astype(np.int32)
    return {"source": src, "target": tgt, "restart": np.tile(np.arange(restarts, dtype=np.int32), len(combos))}


@functools.partial(jax.jit, static_argnums=7)
def _evaluate_triggers(graphdef_params, images, labels, masks, patterns, targets, sources, n_classes):
    """Per trigger: attack success on eligible held-out images, the seed score (mean target confidence x
    closeness, closeness = 1 - mean |x' - x|), and the success from each source class [n_classes] (NaN for
    the target and classes without held-out images): a planted all-to-one trigger works from every source."""
    graphdef, params = graphdef_params
    by_class = jax.nn.one_hot(labels, n_classes)               # [N, classes]
    count = by_class.sum(0)

    def one(mask, pattern, target, source):
        eligible = jnp.where(source >= 0, labels == source, labels != target)
        stamped = stamp(images, mask, pattern)
        probs = jax.nn.softmax(logits_fn(graphdef, params, stamped), -1)
        hit = jnp.argmax(probs, -1) == target
        closeness = 1.0 - jnp.mean(jnp.abs(stamped - images), axis=(1, 2, 3))
        n = jnp.maximum(eligible.sum(), 1)
        per_source = jnp.where((count > 0) & (jnp.arange(n_classes) != target),
                               (hit[:, None] * by_class).sum(0) / jnp.maximum(count, 1), jnp.nan)
        return (jnp.sum(hit * eligible) / n, jnp.sum(probs[:, target] * closeness * eligible) / n, per_source)

    return jax.lax.map(lambda a: one(*a), (masks, patterns, targets, sources))


def run(model, data: ImageSet, config: ScanConfig = ScanConfig(), *, name: str = "<model>",
        on_chunk=None, reference: Reference | None = None) -> ScanResult:
    """Scan `model` (an NNX classifier) with clean images `data` for hidden triggers; `name` (the weights
    file) is what error messages and the report call the model. `reference` (`load_reference`): scans of
    clean models of the same architecture, whose per-class norms then decide instead of the size and
    symmetry statistics (the symmetry search is skipped)."""
    weights_name = name
    _check_images(model, data, weights_name)
    t0 = time.time()
    graphdef, params = pure_apply(model)
    _check_finite_params(params, weights_name)
    logits = np.asarray(logits_fn(graphdef, params, jnp.asarray(data.images[:256])))
    if not np.isfinite(logits).all():
        raise InputError(f"{weights_name}: the model's outputs on {data.source} are not finite (NaN / inf logits); "
                         "refusing to scan it")
    n_classes = int(logits.shape[-1])
    if n_classes < 3:   # with 1 or 2 norms the MAD index cannot exceed the threshold: the verdict would be empty
        raise InputError(f"{weights_name}: the model has {n_classes} output(s); an outlier among the classes' trigger "
                         "norms needs at least 3 classes")
    holdout = min(config.holdout, len(data.labels) // 2)
    pool_x, pool_y = data.images[:-holdout], data.labels[:-holdout]
    eval_x, eval_y = data.images[-holdout:], data.labels[-holdout:]

    _check_labels(data, pool_y, n_classes, config)
    architecture = {"name": type(model).__name__, "input_shape": list(model.input_shape)}
    if reference is not None:
        if reference.norms.shape[1] != n_classes:
            raise InputError(f"{weights_name}: the model has {n_classes} classes but the reference reports have "
                             f"{reference.norms.shape[1]} ({reference.sources[0]})")
        for source, recorded in zip(reference.sources, reference.architectures):
            if recorded is not None and recorded != architecture:
                raise InputError(f"{source}: field `architecture` is {recorded} but the scanned model is "
                                 f"{architecture}: the references must be clean models of the same architecture")
    problem = TriggerInversion(params=params, images=jnp.asarray(pool_x), labels=jnp.asarray(pool_y),
                               graphdef=graphdef, cfg=config.inversion)
    lanes = _lanes(n_classes, config.run.restarts, config.pairs)
    result = engine.run(problem, lanes, config.run, desc=f"scan {len(lanes['target'])} lanes", on_chunk=on_chunk)
    groups = lane_groups(zip(lanes["source"].tolist(), lanes["target"].tolist()))
    _check_all_failed(groups, result.failed_at, weights_name)
    st = result.state

    final_mask, final_pattern = np.asarray(to_mask(st.raw["mask"])), np.asarray(to_mask(st.raw["pattern"]))
    found = np.isfinite(st.best_l1)
    masks = np.where(found[:, None, None], st.best_mask, final_mask)
    patterns = np.where(found[:, None, None, None], st.best_pattern, final_pattern)
    l1 = masks.reshape(len(masks), -1).sum(1)

    # best restart per (source, target): smallest norm among those that reached the success threshold
    chosen = best_per_group(groups.values(), lambda i: (not found[i], l1[i]))
    asr, score, per_source = _evaluate_triggers(
        (graphdef, params), jnp.asarray(eval_x), jnp.asarray(eval_y), jnp.asarray(masks[chosen]),
        jnp.asarray(patterns[chosen]), jnp.asarray(lanes["target"][chosen]), jnp.asarray(lanes["source"][chosen]),
        n_classes)
    per_source = np.asarray(per_source)
    norms = l1[chosen]
    index = mad_anomaly_index(norms)
    nc_flags = flag_outliers(norms)

    entries = []
    for k, ((s, t), idx) in enumerate(groups.items()):
        e = {"label": t, "l1_norm": float(norms[k]), "anomaly_index": float(index[k]),
             "attack_success": float(asr[k]), "score": float(score[k]), "found": bool(found[chosen[k]]),
             "flagged": bool(nc_flags[k]), "neural_cleanse_flagged": bool(nc_flags[k]),
             "restart_l1_norms": [float(l1[i]) if found[i] else None for i in idx],
             "source_success": [None if np.isnan(v) else float(v) for v in per_source[k]],
             "min_source_success": float(np.nanmin(per_source[k])) if np.isfinite(per_source[k]).any() else None,
             "steps": [int(result.steps[i]) for i in idx]}
        if config.pairs:
            e["source"] = s
        entries.append(e)
    failures = [{"label": int(lanes["target"][i]), "source": int(lanes["source"][i]),
                 "restart": int(lanes["restart"][i]), "step": int(result.failed_at[i]),
                 "message": "loss or trigger became NaN; this restart was frozen, the others went on"}
                for i in np.flatnonzero(result.failed_at >= 0)]
    report = {
        "verdict": "",
        "flagged": [],
        "classes" if not config.pairs else "pairs": entries,
        "failures": failures,
        "model": weights_name,
        "architecture": architecture,
        "data": {"source": data.source, "optimisation_images": len(pool_y), "holdout_images": holdout},
        "config": _config_record(config),
        "lanes": len(lanes["target"]),
        "steps_run": int(result.steps.max()),
        "resumed_from_step": result.resumed_from_step,
        "devices": result_devices(config.run.devices),
    }
    seconds = {"inversion": round(time.time() - t0, 2)}
    margin_images = None
    if config.margin is not None:
        started = time.time()
        report["max_margin"], margin_images = _max_margin(graphdef, params, model.input_shape, n_classes, config)
        seconds["max_margin"] = round(time.time() - started, 2)
    if config.pairs:  # Neural Cleanse's rule over the pairs; the per-class view: each target's smallest pair
        flagged = sorted({e["label"] for e in entries if e["flagged"]})
        report["classes"] = per_target(entries)
        report["verdict"] = verdict(entries, {t: [] for t in flagged}, pairs=True)
    else:
        size = size_statistics(norms, [[v for v in e["restart_l1_norms"] if v is not None] for e in entries])
        statistics = size if reference is None else size | reference_statistics(norms, reference.norms)
        for k, e in enumerate(entries):
            e.update({name: float(values[k]) for name, values in statistics.items()})
        if reference is not None:
            report["reference"] = {"models": reference.sources, "n": len(reference.sources)}
        cfg = config.decision
        if cfg.symmetry and reference is None:
            started = time.time()
            symmetry = _symmetry(problem, entries, suspects(size["size_z"], cfg), n_classes, pool_y, config)
            by_label = {e["label"]: e for e in entries}
            for c, sym in symmetry.items():
                by_label[c]["asymmetry"] = sym["asymmetry"]
            report["symmetry"] = {str(c): sym for c, sym in symmetry.items()}
            seconds["symmetry"] = round(time.time() - started, 2)
        reasons = decide(entries, report.get("max_margin"), cfg)
        for e in entries:
            e["flagged"] = e["label"] in reasons
        flagged = sorted(reasons)
        report["verdict"] = verdict(entries, reasons, pairs=False)
        report["decision"] = {"reasons": {str(t): r for t, r in reasons.items()}, "config": dataclasses.asdict(cfg),
                              "neural_cleanse_flagged": [e["label"] for e in entries if e["neural_cleanse_flagged"]]}
    if "max_margin" in report:
        for e in report["classes"]:
            e["max_margin"] = report["max_margin"]["statistics"][e["label"]]
    report["flagged"] = flagged
    report["seconds"] = round(time.time() - t0, 2)
    report["seconds_by_search"] = seconds
    return ScanResult(report, masks[chosen], patterns[chosen], margin_images)


def _symmetry(problem: TriggerInversion, entries: list[dict], targets: list[int], n_classes: int,
              pool_y: np.ndarray, config: ScanConfig) -> dict[int, dict]:
    """K-Arm's symmetry check for each suspect t, one pair search t -> s per other class s (one restart
    each, all suspects in one program): the way back out of t. The way in is t's all-to-one trigger (it
    flips every class into t, so each s -> t pair needs no more), which saves the forward pair searches.
    {t: the reverse norms, the forward norm and their asymmetry}."""
    present = set(np.unique(pool_y).tolist())
    targets = [t for t in targets if t in present]   # t -> s needs images of t
    if not targets:
        return {}
    combos = [(t, s) for t in targets for s in range(n_classes) if s != t]
    lanes = {"source": np.array([t for t, _ in combos], np.int32), "target": np.array([s for _, s in combos],
                                                                                        np.int32)}
    run = config.run
    ckpt = None if run.checkpoint_dir is None else f"{run.checkpoint_dir}/{SYMMETRY_CHECKPOINT}"
    result = engine.run(problem, lanes, run.replace(checkpoint_dir=ckpt),
                        desc=f"symmetry of class(es) {targets}: {len(combos)} pair lanes")
    whole_image = float(np.prod(problem.images.shape[2:]))
    out_norm = np.where(np.isfinite(result.state.best_l1), result.state.best_l1, whole_image)
    by_label = {e["label"]: e for e in entries}
    out = {}
    for t in targets:
        pick = [i for i, (src, _) in enumerate(combos) if src == t]
        reverse = [float(out_norm[i]) for i in pick]
        forward = [by_label[t]["l1_norm"]] * len(pick)
        out[t] = {"to_classes": [combos[i][1] for i in pick], "reverse_l1_norms": reverse,
                  "forward_l1_norm": by_label[t]["l1_norm"], "asymmetry": asymmetry(forward, reverse)}
    return out


def _max_margin(graphdef, params, shape, n_classes: int, config: ScanConfig) -> tuple[dict, np.ndarray]:
    """MM-BD: every class x start in one program, then the Gamma test on the per-class maxima."""
    run = config.run
    ckpt = None if run.checkpoint_dir is None else f"{run.checkpoint_dir}/{MARGIN_CHECKPOINT}"
    statistics, images = max_margins(graphdef, params, shape, n_classes, config.margin,
                                     run.replace(checkpoint_dir=ckpt))
    target, p = gamma_p_value(statistics)
    return {"statistics": [float(v) for v in statistics], "target": target, "p_value": p,
            "flagged": bool(p <= config.margin.alpha), "alpha": config.margin.alpha,
            "rule": "per class, the largest margin logit_c - max_other reached by projected gradient ascent from "
                    f"{config.margin.starts} random images ({config.margin.steps} steps); flagged when the largest "
                    "class's p-value under a Gamma fitted to the others (the largest censored) is <= alpha"}, images


def _config_record(config: ScanConfig) -> dict:
    """The settings report.json records (the flat layout of earlier releases: readers keep working)."""
    run = config.run
    return {"restarts": run.restarts, "max_steps": run.max_steps, "chunk_steps": run.chunk_steps,
            "holdout": config.holdout, "pairs": config.pairs, "seed": run.seed, "n_devices": run.devices,
            "inversion": dataclasses.asdict(config.inversion)}


def result_devices(n: int | None) -> str:
    devices = jax.devices()[: n or None]
    return f"{len(devices)} x {devices[0].device_kind}"
