"""`jaxrisk scan` and `jaxrisk demo`: hidden triggers in an image classifier (inversion, margin, symmetry)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxrisk.cli.common import POSITIVE, add_run_flags, run_config
from jaxrisk.errors import InputError
from jaxrisk.io import prepare_out_dir


def add_parser(sub) -> None:
    for name, func, text in (("scan", cmd_scan, "scan an image classifier for hidden triggers (Neural Cleanse "
                                                     "inversion, MM-BD maximum margin, symmetry; one verdict)"),
                             ("demo", cmd_demo, "scan the embedded default: a trojaned and a clean digits model")):
        p = sub.add_parser(name, help=text)
        _add_scan_args(p)
        p.set_defaults(func=func)


def _add_scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="PyTorch-layout .safetensors state dict to scan (default: the embedded demo)")
    p.add_argument("--arch", choices=["mnist_cnn", "lenet5", "resnet8", "mlp"],
                   help="architecture of --weights (default mnist_cnn)")
    p.add_argument("--mnist", metavar="DIR", help="directory with the four MNIST IDX files (test split is used)")
    p.add_argument("--out", default="runs/scan",
                   help="output directory (report.json, triggers.png, triggers.safetensors)")
    p.add_argument("--pairs", action="store_true", help="source->target pair mode instead of all-to-one")
    p.add_argument("--max-margin", action=argparse.BooleanOptionalAction, default=True,
                   help="MM-BD's data-free maximum-margin test beside the inversion (any trigger form, no mask "
                        "prior); on by default, part of the verdict")
    p.add_argument("--no-symmetry", action="store_true",
                   help="skip the symmetry (pair) search of the suspects; their size alone then decides")
    p.add_argument("--margin-starts", type=int, help="random starts per class of that test (default 10)")
    p.add_argument("--margin-steps", type=int, help="ascent steps per start (default 300)")
    for name, text in (("smoothness", "total variation of the mask (scattered triggers)"),
                       ("blocking", "the image with the trigger area blanked must keep its label"),
                       ("overlaying", "the trigger alone must give the target")):
        p.add_argument(f"--{name}", type=float, default=0.0, help=f"TABOR's weight on {text} (default 0: off)")
    p.add_argument("--reference", nargs="+", metavar="REPORT",
                   help="report.json of scans of 2 or more clean models of the same architecture, trained on the "
                        "same data and scanned with the same settings: a class is then flagged when its trigger "
                        "is far smaller than theirs for that class (replaces the size and symmetry statistics)")
    p.add_argument("--batch-size", type=POSITIVE, help="images per inversion step (default 16)")
    add_run_flags(p, restarts_help="restarts per class (default 1; demo 4)",
                  steps_help="step budget per restart (default 300)")


def _print_report(report: dict, title: str) -> None:
    print(f"\n{title}")
    key, head = ("reference_z", "ref z") if "reference" in report else ("asymmetry", "asym")
    print(f"  {'class':>5} {'L1 norm':>8} {'anomaly':>8} {'size z':>7} {head:>5} {'margin':>7} {'attack':>7}"
          "  flagged")
    for e in report["classes"]:
        second = f"{e[key]:.2f}" if key in e else "-"
        margin = f"{e['max_margin']:.1f}" if "max_margin" in e else "-"
        size = f"{e['size_z']:.2f}" if "size_z" in e else "-"
        print(f"  {e['label']:>5} {e['l1_norm']:>8.2f} {e['anomaly_index']:>8.2f} {size:>7} {second:>5} {margin:>7} "
              f"{100 * e['attack_success']:>6.0f}%  {'<-- FLAGGED' if e['flagged'] else ''}")
    if "max_margin" in report:
        m = report["max_margin"]
        print(f"  maximum margin (MM-BD): largest class {m['target']}, p-value {m['p_value']:.3g} "
              f"({'FLAGGED' if m['flagged'] else 'not flagged'} at {m['alpha']})")
    for f in report["failures"]:
        print(f"  restart {f['restart']} of class {f['label']}: NaN at step {f['step']} (frozen; others went on)")
    print(f"  verdict: {report['verdict']}  ({report['seconds']:.0f} s, {report['lanes']} searches in one program)")


def _run_scan(model, data, args, out: Path, name: str, **defaults) -> None:
    """Scan one model into `out` (checkpointing in out/checkpoint, removed once the report is written)."""
    from jaxrisk.scan import DecisionConfig, InversionConfig, MarginConfig, ScanConfig, load_reference, run
    from jaxrisk.scan.run import remove_scan_checkpoint

    ckpt = out / "checkpoint"
    given = {k: v for k, v in (("starts", args.margin_starts), ("steps", args.margin_steps)) if v is not None}
    if given and not args.max_margin:
        raise InputError("--margin-starts and --margin-steps set the maximum-margin test, which --no-max-margin "
                         "turns off")
    margin = MarginConfig(**given) if args.max_margin else None
    inversion = InversionConfig(smoothness=args.smoothness, blocking=args.blocking, overlaying=args.overlaying,
                                **({} if args.batch_size is None else {"batch_size": args.batch_size}))
    config = ScanConfig(run=run_config(args, ScanConfig().run, checkpoint_dir=ckpt, **defaults), pairs=args.pairs,
                        margin=margin, inversion=inversion, decision=DecisionConfig(symmetry=not args.no_symmetry))
    reference = load_reference(args.reference, config) if args.reference else None
    result = run(model, data, config, name=name, reference=reference)
    json_path, png_path = result.write(out)
    remove_scan_checkpoint(ckpt)
    _print_report(result.report, f"{name}  ->  {json_path}, {png_path}")


def cmd_scan(args) -> int:
    if args.weights is None:
        if args.mnist or args.arch:
            raise InputError("--mnist and --arch describe the model of --weights; without --weights, "
                             "jaxrisk scan runs the embedded demo")
        return cmd_demo(args)
    args.arch = args.arch or "mnist_cnn"
    from jaxrisk.data import load_digits, load_mnist
    from jaxrisk.models import load_classifier

    out = prepare_out_dir(args.out)
    if args.mnist:
        data = load_mnist(args.mnist)
        model = load_classifier(args.weights, args.arch, input_shape=data.shape if args.arch == "mlp" else None)
    else:  # the embedded digits, at the model's resolution
        model = load_classifier(args.weights, args.arch)
        side = model.input_shape[-1]
        if side % 8 or model.input_shape[0] != 1:
            raise InputError(f"{args.weights}: the model takes {'x'.join(map(str, model.input_shape))} images; "
                             "the embedded digits come at 8x8 or 16x16, so pass --mnist DIR")
        data = load_digits("test", size=side)
    _run_scan(model, data, args, out, str(args.weights))
    return 0


def cmd_demo(args) -> int:
    """Train (once, cached) a trojaned and a clean digits MLP and scan both."""
    from jaxrisk.data import load_digits
    from jaxrisk.demo import demo_models

    if args.weights or args.mnist or args.arch or args.reference:
        raise InputError("jaxrisk demo scans its own embedded models; to scan yours use jaxrisk scan --weights FILE")
    out = prepare_out_dir(args.out)
    models = demo_models(progress=not args.no_progress)
    data = load_digits("test")
    print("jaxrisk demo: a contractor delivered a digit classifier (scikit-learn digits at 16x16, MLP).")
    print("Is there a hidden trigger? Scanning every class x restarts in one compiled program...")
    for name, model in models.items():
        _run_scan(model, data, args, out / name, f"{name} model", restarts=4)
    print(f"\nThe trojaned model's planted trigger: class 3, a 2x2 white patch (4 px). Figures: {out}/*/triggers.png")
    return 0
