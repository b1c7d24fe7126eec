"""`jaxrisk redteam`: GCG (or ARCA) over a behaviour file; writes OUT/results.jsonl (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxrisk.cli.common import POSITIVE, add_model_flags, add_run_flags, comma_list, load_lm, number, run_config
from jaxrisk.errors import InputError
from jaxrisk.io import prepare_out_dir


def add_parser(sub) -> None:
    p = sub.add_parser("redteam", help="GCG: find suffixes that make a language model say chosen targets "
                                          "(--method arca: requests and outputs jointly)")
    add_model_flags(p)
    p.add_argument("--behaviors", required=True, metavar="FILE", help="CSV or JSONL with goal,target (AdvBench)")
    p.add_argument("--out", required=True, help="output directory: results.jsonl (+ a checkpoint while running)")
    p.add_argument("--method", default="gcg", choices=["gcg", "arca"],
                   help="gcg: an adversarial suffix per behaviour (default); arca: a request and its output jointly")
    p.add_argument("--search-width", type=POSITIVE, default=512, help="candidates per step (B)")
    p.add_argument("--topk", type=POSITIVE, default=256, help="tokens per position from the gradient")
    p.add_argument("--suffix-len", type=POSITIVE, default=20)
    p.add_argument("--group", type=POSITIVE, default=8, help="behaviours per compiled run (x restarts lanes)")
    p.add_argument("--mellowmax", type=number(0.0, above=True), default=None, metavar="ALPHA",
                   help="mellowmax target loss")
    p.add_argument("--margin", type=number(0.0), default=None, metavar="M",
                   help="margin target loss: every target token the argmax by at least M logits (0 is greedy success)")
    p.add_argument("--fluency-weight", type=number(), default=None,
                   help="weight of log p(request) in the objective (default 0; arca: 1, its plausibility weight)")
    p.add_argument("--fluency-weights", type=comma_list(number(), "numbers", "0,0.3,1"), default=None,
                   metavar="W,W,...", help="gcg: sweep the weight of log p(request) as lanes of one program; one "
                   "result row per behaviour and weight, and the front (success vs request perplexity) in "
                   "OUT/front.json and OUT/front.png")
    p.add_argument("--danger-probe-data", metavar="FILE",
                   help="JSONL of {text, label}: train a linear danger probe and add its log-score")
    p.add_argument("--danger-probe-layer", type=int, default=None, metavar="N",
                   help="the layer whose residual the danger probe reads (default: the middle one)")
    p.add_argument("--danger-probe-pool", choices=("mean", "max"), default="mean",
                   help="the probe's logit on the mean residual over the text, or at its highest-scoring position")
    p.add_argument("--danger-weight", type=number(), default=1.0)
    p.add_argument("--plain", action="store_true",
                   help="plain GCG: rank by loss, no restarts, '! ! ...' start, positions spread evenly (each may "
                        "still be set by its own flag)")
    p.add_argument("--select", choices=["loss", "matches"], default=None,
                   help="rank candidates first by the target tokens the model gets right (default), or by loss")
    p.add_argument("--buffer-size", type=int, default=None, metavar="K",
                   help="search from the best of the K best suffixes kept (0: move to each step's best)")
    p.add_argument("--n-replace", type=POSITIVE, default=None, help="positions swapped per candidate at the start")
    p.add_argument("--n-replace-final", type=POSITIVE, default=None, help="... falling linearly to this at the end")
    p.add_argument("--positions", choices=("cyclic", "random"), default=None,
                   help="single swaps: positions drawn at random per candidate (default) or spread evenly")
    p.add_argument("--revisit", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-revisit: never evaluate a suffix twice")
    p.add_argument("--max-perplexity", type=number(1.0), default=None, metavar="PPL",
                   help="never take a candidate whose request (goal + suffix) has a higher perplexity under the model")
    p.add_argument("--warm-start-step", type=int, default=None, metavar="S",
                   help="after S steps, unsolved behaviours go on from the suffix (theirs, or one that solved "
                        "another behaviour) that scores their target best (0: off)")
    p.add_argument("--probe-layers", type=int, default=None, metavar="L",
                   help="probe sampling: the model's first L layers rank the candidates, the model scores a random "
                        "1/16 and the draft's best 1/R (0: off)")
    p.add_argument("--probe-ratio", type=POSITIVE, default=None, metavar="R")
    p.add_argument("--init-from-target", action=argparse.BooleanOptionalAction, default=None,
                   help="start each suffix as the target's text repeated (default; --no-init-from-target: '! ! ...')")
    p.add_argument("--restart-patience", type=int, default=None, metavar="P",
                   help="a lane with no better suffix for P steps starts again from its start suffix (default 50; "
                        "0: off)")
    p.add_argument("--restart-noise", type=number(0.0), default=None, metavar="SHARE",
                   help="each restart redraws this share (0-1) of the start suffix's tokens at random (default 0)")
    p.add_argument("--system-prompt", metavar="TEXT", help="chat models: a system turn before each request")
    p.add_argument("--no-filter", action="store_true", help="skip the decode/encode round-trip filter")
    p.add_argument("--allow-non-ascii", action="store_true")
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--request-len", type=POSITIVE, default=6, help="arca: request tokens")
    p.add_argument("--output-len", type=POSITIVE, default=4, help="arca: output tokens")
    p.add_argument("--candidates", type=POSITIVE, default=64, help="arca: exact evaluations per step")
    add_run_flags(p, restarts_help="independent restarts per behaviour", restarts_default=1,
                  steps_help="steps per behaviour (gcg: early stop on success); --max-steps is the same flag",
                  max_steps_default=250, steps_alias=True)
    p.set_defaults(func=cmd_redteam)


def cmd_redteam(args) -> int:
    """Search every behaviour; writes OUT/results.jsonl (resumable)."""
    from jaxrisk.data.prompts import load_behaviors
    from jaxrisk.redteam import PLAIN_GCG, ARCAConfig, GCGConfig, RedteamConfig, run
    from jaxrisk.scorers.lm import SequenceScorer

    behaviors = load_behaviors(args.behaviors)
    out = prepare_out_dir(args.out)
    run_cfg = run_config(args, RedteamConfig().run)
    lm = load_lm(args, run_cfg)
    arca = args.method == "arca"
    sweep = args.fluency_weights
    if sweep is not None and (arca or args.fluency_weight is not None):
        raise InputError("--fluency-weights sweeps GCG's weight of log p(request): not with --method arca or "
                         "--fluency-weight")
    fluency = 0.0 if sweep is not None else args.fluency_weight
    if fluency is None:
        fluency = ARCAConfig().plausibility_weight if arca else 0.0
    parts = dict(PLAIN_GCG) if args.plain else {}
    parts |= {name: getattr(args, name) for name in ("select", "buffer_size", "n_replace", "n_replace_final",
                                                            "warm_start_step", "max_perplexity", "margin",
                                                            "restart_patience", "probe_layers", "probe_ratio",
                                                            "init_from_target", "positions", "restart_noise")
             if getattr(args, name) is not None}
    if args.revisit is not None:
        parts["no_revisit"] = not args.revisit
    gcg = GCGConfig(search_width=args.search_width, topk=args.topk, suffix_len=args.suffix_len,
                    mellowmax_alpha=args.mellowmax, early_stop=not args.no_early_stop,
                    filter_retokenization=not args.no_filter, allow_non_ascii=args.allow_non_ascii, **parts)
    config = RedteamConfig(run=run_cfg, method=args.method, group=args.group, gcg=gcg, system_prompt=args.system_prompt,
                           arca=ARCAConfig(request_len=args.request_len, output_len=args.output_len,
                                           candidates=args.candidates, plausibility_weight=fluency,
                                           danger_weight=args.danger_weight),
                           weight_grid=None if sweep is None else
                           [[w] + [args.danger_weight] * bool(args.danger_probe_data) for w in sweep])
    # gcg: (weight, scorer) terms of the objective; arca: scorers by position (plausibility, then danger),
    # weighted by config.arca alone (ARCA multiplies in the pair's weight: 1.0)
    extras = []
    if fluency or arca or sweep is not None:
        extras.append((1.0 if arca else fluency, SequenceScorer.of(lm)))
    if args.danger_probe_data:
        probe = _probe_from_file(lm, args.danger_probe_data, args.danger_probe_layer, args.danger_probe_pool)
        extras.append((1.0 if arca else args.danger_weight, probe))
    rows = run(lm, behaviors, config, out_dir=out, extras=extras, source=args.behaviors).rows
    if sweep is not None:
        _write_front(rows, out, config)
    ok = sum(r["success"] for r in rows)
    broken = sum("error" in r for r in rows)
    print(f"{ok}/{len(rows)} behaviours succeeded (greedy output starts with the target)"
          f"{f'; {broken} have no result (every restart turned NaN: see error in the file)' if broken else ''} -> "
          f"{out / 'results.jsonl'}")
    return 0


def _write_front(rows, out, config) -> None:
    """OUT/front.json and OUT/front.png: attack success vs median request perplexity per swept weight."""
    from jaxrisk.io import write_json
    from jaxrisk.redteam.report import plausibility_front, plot_plausibility_front

    front = plausibility_front(rows)
    for point in front:
        print(f"weight of log p(request) {point['weights'][0]:g}: {point['successes']}/{point['behaviours']} "
              f"succeeded, median request perplexity {point['median_request_perplexity']:.1f}")
    write_json(out / "front.json", front)
    if front:   # empty only when every behaviour's search turned NaN (the rows say so)
        plot_plausibility_front(front, out / "front.png", f"GCG plausibility front: {front[0]['behaviours']} "
                                f"behaviours, {config.run.max_steps} steps x {config.gcg.search_width} candidates")


def _probe_from_file(lm, path, layer: int | None, pool: str):
    from jaxrisk.data.text import jsonl_rows, text_field
    from jaxrisk.scorers.probe import train_probe

    texts, labels = [], []
    expected = "'text' and 'label' (1 = harmful, 0 = harmless)"
    for n, row in jsonl_rows(path, expected):
        if "text" not in row or row.get("label") not in (0, 1) or isinstance(row.get("label"), bool):
            raise InputError(f"{path}:{n}: expected a JSON object with {expected}")
        texts.append(text_field(Path(path), n, row, "text"))
        labels.append(int(row["label"]))
    if len(set(labels)) < 2:
        raise InputError(f"{path}: a danger probe needs rows of both labels 0 and 1 (found {sorted(set(labels))})")
    if layer is not None and not 0 <= layer < lm.cfg.n_layers:
        raise InputError(f"--danger-probe-layer: {layer} is not a layer of the model (0..{lm.cfg.n_layers - 1})")
    return train_probe(lm, texts, labels, layer=layer, pool=pool)
