"""`jaxrisk detect`: flag the inputs on which a model runs an anomalous mechanism (activation detectors fit
on trusted data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxrisk.cli.common import POSITIVE, add_progress_flag, add_seed_flag, comma_list, dtype, number
from jaxrisk.errors import InputError
from jaxrisk.io import cache_root, prepare_out_dir


def _shrinkage(text: str) -> float | None:
    if text.strip().lower() in ("ledoit-wolf", "lw"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected ledoit-wolf or a number in [0, 1], got {text!r}")
    return value


def default_cache() -> Path:
    return cache_root() / "activations"


# the choices of jaxrisk.anomaly.config, spelled out so that `--help` imports no JAX (a test checks they agree)
DETECTOR_NAMES = ("mahalanobis", "que", "spectral", "spectre", "probe", "distillation")
AGGREGATES = ("mean", "max")


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help="flag anomalous inputs from a model's activations (detectors fit on "
                                      "trusted data)",
                       description="Fit an anomaly detector on a model's activations over trusted (clean) data and "
                                   "score every input: OUT/scores.jsonl (one line per input, in input order), "
                                   "OUT/report.json (threshold at a false-positive rate on held-out trusted data; "
                                   "AUROC / AP when the inputs carry labels) and OUT/scores.png.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", metavar="FILE", help="image classifier: PyTorch-layout .safetensors")
    model.add_argument("--model", metavar="DIR", help="language model: local Hugging Face directory")
    p.add_argument("--arch", choices=["mnist_cnn", "lenet5", "resnet8", "mlp"], default="mnist_cnn",
                   help="architecture of --weights (default mnist_cnn)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="--model parameter dtype (default: as the checkpoint declares)")
    p.add_argument("--trusted", required=True, metavar="PATH",
                   help="trusted data: with --weights an MNIST directory (its training split) or an images file; "
                        "with --model a JSONL file of {text} rows")
    p.add_argument("--inputs", required=True, metavar="FILE",
                   help="inputs to score: with --weights .safetensors / .npz with `images` [N, C, H, W] float in "
                        "[0, 1] (optional `labels`, 1 = anomalous); with --model JSONL {text, optional label}")
    p.add_argument("--untrusted", metavar="FILE", default=None,
                   help="unlabelled, possibly mixed data for que / spectral / spectre, in the inputs' format "
                        "(default: the inputs themselves)")
    p.add_argument("--out", required=True, help="output directory: scores.jsonl, report.json, scores.png")
    p.add_argument("--detector", choices=DETECTOR_NAMES, default="que",
                   help="detector (default que: the best without labels in the zoo study; probe needs labelled "
                        "inputs; distillation trains a smaller student on the trusted data and scores the KL "
                        "between its outputs and the model's)")
    p.add_argument("--student-hidden", type=comma_list(POSITIVE, "widths", "64 or 128,64"), default=(64,),
                   help="distillation, classifiers: the MLP student's hidden widths (default 64)")
    p.add_argument("--student-layers", type=POSITIVE, default=None,
                   help="distillation, language models: blocks the student keeps (default: half)")
    p.add_argument("--distill-steps", type=POSITIVE, default=2000, help="distillation: training steps (default 2000)")
    p.add_argument("--kl", choices=["forward", "reverse"], default="forward",
                   help="distillation: KL(model || student) (forward, default) or KL(student || model)")
    p.add_argument("--layers", type=comma_list(str, "layer names", "fc1,fc2"), default=None,
                   help="comma-separated layer names (classifier layer names, or hook names such as "
                        "blocks.0.hook_resid_post; default: every classifier layer, every block's hook_resid_post)")
    p.add_argument("--aggregate", choices=AGGREGATES, default="mean",
                   help="how standardised layer scores combine (default mean)")
    p.add_argument("--shrinkage", type=_shrinkage, default=None, metavar="ledoit-wolf|X",
                   help="covariance shrinkage towards a scaled identity: ledoit-wolf (default) or a coefficient "
                        "in [0, 1]")
    p.add_argument("--fpr", type=number(0.0, above=True), default=0.01,
                   help="false-positive rate on held-out trusted data that sets the threshold (default 0.01)")
    p.add_argument("--max-trusted", type=POSITIVE, default=20000,
                   help="use at most this many trusted examples (default 20000)")
    p.add_argument("--reduce", choices=["mean", "last"], default="mean",
                   help="language models: average activations over a text's tokens or take its last (default mean)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help=f"activation cache, shared by runs on the same model and data (default {default_cache()})")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the activation cache")
    add_seed_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_detect)


def _classifier_inputs(args, max_trusted: int):
    """(model, trusted images, inputs, labels, untrusted images or None, source)."""
    import numpy as np

    from jaxrisk.anomaly.data import read_images
    from jaxrisk.data import load_mnist
    from jaxrisk.models import load_classifier

    model = load_classifier(args.weights, args.arch)
    shape = tuple(model.input_shape)
    if Path(args.trusted).is_dir():
        trusted, source = load_mnist(args.trusted, "train").images, f"{args.trusted} (training split)"
        if tuple(trusted.shape[1:]) != shape:
            raise InputError(f"--trusted {args.trusted}: images are {list(trusted.shape[1:])}, the model takes "
                             f"{list(shape)}")
    else:
        trusted, _ = read_images(args.trusted, shape)
        source = str(args.trusted)
    if len(trusted) > max_trusted:
        trusted = trusted[np.random.default_rng(args.seed).permutation(len(trusted))[:max_trusted]]
    inputs, labels = read_images(args.inputs, shape)
    untrusted = None if args.untrusted is None else read_images(args.untrusted, shape)[0]
    return model, trusted, inputs, labels, untrusted, {
        "model": str(args.weights), "arch": args.arch, "trusted": source, "trusted_rows": len(trusted),
        "inputs": str(args.inputs), "untrusted": args.untrusted}


def _lm_inputs(args, max_trusted: int):
    """(model, trusted texts, input texts, labels, untrusted texts or None, source)."""
    from jaxrisk.anomaly.data import read_texts
    from jaxrisk.models import load_pretrained

    lm = load_pretrained(args.model, dtype(args))
    trusted = read_texts(args.trusted, "trusted")[0][:max_trusted]
    inputs, labels = read_texts(args.inputs, "inputs")
    untrusted = None if args.untrusted is None else read_texts(args.untrusted, "untrusted")[0]
    return lm, trusted, inputs, labels, untrusted, {
        "model": str(args.model), "trusted": str(args.trusted), "trusted_rows": len(trusted),
        "inputs": str(args.inputs), "untrusted": args.untrusted, "reduce": args.reduce}


def _detect(args, config, cache):
    """The DetectResult of the command's model, data and detector."""
    from jaxrisk.anomaly import distill
    from jaxrisk.anomaly.data import classifier_task, lm_task
    from jaxrisk.anomaly.run import run

    if args.weights:
        model, trusted, inputs, labels, untrusted, source = _classifier_inputs(args, args.max_trusted)
        from jaxrisk.models.classifiers import pure_apply

        graphdef, params = pure_apply(model)
        if config.detector == "distillation":
            return distill.run_classifier(graphdef, params, trusted, inputs, config, labels=labels, source=source)
        acts = classifier_task(graphdef, params, trusted, inputs, layers=args.layers or tuple(model.tap_names),
                               labels=labels, untrusted=untrusted, cache_dir=cache, source=source)
        return run(acts, config)
    lm, trusted, inputs, labels, untrusted, source = _lm_inputs(args, args.max_trusted)
    if config.detector == "distillation":
        return distill.run_lm(lm, trusted, inputs, config, labels=labels, reduce=args.reduce, source=source)
    layers = args.layers or tuple(f"blocks.{i}.hook_resid_post" for i in range(lm.cfg.n_layers))
    acts = lm_task(lm, trusted, inputs, layers=layers, reduce=args.reduce, labels=labels, untrusted=untrusted,
                   cache_dir=cache, source=source)
    return run(acts, config)


def cmd_detect(args) -> int:
    from jaxrisk.anomaly.config import DetectConfig, DistillConfig
    from jaxrisk.search.config import RunConfig

    if args.weights is None and Path(args.trusted).is_dir():
        raise InputError(f"--trusted {args.trusted}: is a directory; with --model it must be a JSONL file of "
                         "{text} rows")
    out = prepare_out_dir(args.out)
    if args.detector == "distillation" and (args.layers or args.untrusted):
        raise InputError("the distillation detector compares outputs, on no layers and no untrusted set: drop "
                         "--layers / --untrusted")
    config = DetectConfig(run=RunConfig(seed=args.seed, progress=not args.no_progress), detector=args.detector,
                          aggregate=args.aggregate, fpr=args.fpr, shrinkage=args.shrinkage,
                          distill=DistillConfig(direction=args.kl, steps=args.distill_steps,
                                                hidden=tuple(args.student_hidden), layers=args.student_layers))
    cache = None if args.no_cache else (args.cache or default_cache())
    result = _detect(args, config, cache)
    paths = result.write(out)
    report = result.report()
    print(f"{report['detector']} on {', '.join(report['layers'])}: {report['n_flagged']} of {report['n_inputs']} "
          f"inputs flagged (threshold {report['threshold']:.3g} at fpr {config.fpr:g} on held-out trusted data)")
    if report["metrics"]:
        m = report["metrics"]["aggregate"]
        print(f"  labels given: AUROC {m['auroc']:.4f}, AP {m['ap']:.4f}, "
              f"TPR at {config.fpr:g} FPR {m[f'tpr_at_{config.fpr:g}_fpr']:.3f}")
    print("  " + ", ".join(str(p) for p in paths))
    return 0
