"""`jaxrisk <command>`: the command line."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from jaxrisk import __version__
from jaxrisk.errors import InputError, require_int, require_number, require_seed
from jaxrisk.io import prepare_out_dir


def _flag_type(convert, check, what: str):
    """argparse type: `convert` the text, then `check` the value with the library's own range checks
    (errors.require_*); argparse reports either failure as `argument --flag: ...` with exit code 2."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check(value)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    return parse


def _int_at_least(minimum: int):
    return _flag_type(int, lambda v: require_int("flag", v, minimum), "an integer")


def _number(minimum: float | None = None, above: bool = False):
    return _flag_type(float, lambda v: require_number("flag", v, minimum, above=above), "a number")


def _penalty_list(text: str) -> list[float]:
    """argparse type: comma-separated sparsity weights, each a finite number >= 0."""
    parse = _number(0.0)
    values = [parse(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 3,4.5,6; got {text!r}")
    return values


POSITIVE = _int_at_least(1)
SEED = _flag_type(int, lambda v: require_seed("flag", v), "an integer")


def _add_scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="PyTorch-layout .safetensors state dict to scan (default: the embedded demo)")
    p.add_argument("--arch", choices=["mnist_cnn", "mlp"], help="architecture of --weights (default mnist_cnn)")
    p.add_argument("--mnist", metavar="DIR", help="directory with the four MNIST IDX files (test split is used)")
    p.add_argument("--out", default="runs/scan",
                   help="output directory (report.json, triggers.png, triggers.safetensors)")
    p.add_argument("--restarts", type=POSITIVE, default=None, help="restarts per class (default 2; demo 4)")
    p.add_argument("--max-steps", type=POSITIVE, default=None, help="step budget per restart")
    p.add_argument("--pairs", action="store_true", help="source->target pair mode instead of all-to-one")
    p.add_argument("--devices", type=POSITIVE, default=None, help="devices to shard restarts over (default: all)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _scan_config(args, **defaults):
    from jaxrisk.scan import ScanConfig

    kw = dict(defaults)
    if args.restarts is not None:
        kw["restarts"] = args.restarts
    if args.max_steps is not None:
        kw["max_steps"] = args.max_steps
    return ScanConfig(pairs=args.pairs, seed=args.seed, n_devices=args.devices, **kw)


def _print_report(report: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"  {'class':>5} {'L1 norm':>8} {'anomaly':>8} {'attack':>7}  flagged")
    for e in report["classes"]:
        print(f"  {e['label']:>5} {e['l1_norm']:>8.2f} {e['anomaly_index']:>8.2f} "
              f"{100 * e['attack_success']:>6.0f}%  {'<-- FLAGGED' if e['flagged'] else ''}")
    for f in report["failures"]:
        print(f"  restart {f['restart']} of class {f['label']}: NaN at step {f['step']} (frozen; others went on)")
    print(f"  verdict: {report['verdict']}  ({report['seconds']:.0f} s, {report['lanes']} searches in one program)")


def _run_scan(model, data, cfg, out: Path, name: str, progress: bool) -> dict:
    from jaxrisk.scan import scan_classifier, write_report

    from jaxrisk.search.engine import remove_checkpoint

    ckpt = out / "checkpoint"
    result = scan_classifier(model, data, cfg, checkpoint_dir=ckpt, progress=progress, weights_name=name)
    json_path, png_path = write_report(result, out)
    remove_checkpoint(ckpt)
    _print_report(result.report, f"{name}  ->  {json_path}, {png_path}")
    return result.report


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
    _run_scan(model, data, _scan_config(args), out, str(args.weights), not args.no_progress)
    return 0


def cmd_demo(args) -> int:
    """Train (once, cached) a trojaned and a clean digits MLP and scan both."""
    from jaxrisk.data import load_digits
    from jaxrisk.demo import demo_models

    if args.weights or args.mnist or args.arch:
        raise InputError("jaxrisk demo scans its own embedded models; to scan yours use jaxrisk scan --weights FILE")
    out = prepare_out_dir(args.out)
    cfg = _scan_config(args, restarts=4)
    models = demo_models(progress=not args.no_progress)
    data = load_digits("test")
    print("jaxrisk demo: a contractor delivered a digit classifier (scikit-learn digits at 16x16, MLP).")
    print("Is there a hidden trigger? Scanning every class x restarts in one compiled program...")
    for name, model in models.items():
        _run_scan(model, data, cfg, out / name, f"{name} model", not args.no_progress)
    print(f"\nThe trojaned model's planted trigger: class 3, a 2x2 white patch (4 px). Figures: {out}/*/triggers.png")
    return 0


def cmd_zoo(args) -> int:
    from jaxrisk.zoo.build import build_zoo

    if args.trojaned + args.clean == 0:
        raise InputError("--trojaned and --clean are both 0: nothing to build")
    build_zoo(prepare_out_dir(args.out), mnist_dir=args.mnist, n_trojaned=args.trojaned, n_clean=args.clean,
              epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    return 0


def _dtype(args):
    return None if args.dtype == "auto" else args.dtype


def cmd_generate(args) -> int:
    """Continue a prompt with a Hugging Face model directory (greedy unless --temperature > 0)."""
    import json

    from jaxrisk.models import load_pretrained

    lm = load_pretrained(args.model, dtype=_dtype(args))
    ids = lm.encode(args.prompt)
    new = lm.generate([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed)[0]
    # decode prompt + continuation together: SentencePiece drops a word's leading space when decoded alone
    head, full = lm.decode(ids), lm.decode(list(ids) + new)
    continuation = full[len(head):] if full.startswith(head) else lm.decode(new)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "prompt_ids": ids.tolist(), "new_ids": new,
                          "continuation": continuation}))
    else:
        print(args.prompt + continuation)
    return 0


def cmd_inspect(args) -> int:
    """Architecture, parameter count, dtype and tokenizer of a model directory."""
    import json

    from jaxrisk.models import load_pretrained

    lm = load_pretrained(args.model, dtype=_dtype(args))
    info = lm.summary()
    tok = lm.tokenizer
    adds_special = len(tok("a")["input_ids"]) > len(tok("a", add_special_tokens=False)["input_ids"])
    info["tokenizer"] = {"class": type(tok).__name__, "vocab": len(tok), "bos": tok.bos_token,
                         "eos": tok.eos_token, "adds_bos": adds_special}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"  {key:>16}: {value}")
    return 0


def cmd_redteam(args) -> int:
    """GCG over a behaviour file; writes OUT/results.jsonl (resumable)."""
    from jaxrisk.data.prompts import load_behaviors
    from jaxrisk.models import load_pretrained
    from jaxrisk.redteam import redteam
    from jaxrisk.search.gcg import GCGConfig

    behaviors = load_behaviors(args.behaviors)
    out = prepare_out_dir(args.out)
    lm = load_pretrained(args.model, dtype=_dtype(args))
    cfg = GCGConfig(search_width=args.search_width, topk=args.topk, suffix_len=args.suffix_len,
                    mellowmax_alpha=args.mellowmax, early_stop=not args.no_early_stop,
                    filter_retokenization=not args.no_filter, allow_non_ascii=args.allow_non_ascii)
    extras = []
    if args.fluency_weight:
        extras.append((args.fluency_weight, _fluency_scorer(lm)))
    if args.danger_probe_data:
        extras.append((args.danger_weight, _probe_from_file(lm, args.danger_probe_data)))
    rows = redteam(lm, behaviors, out, cfg, restarts=args.restarts, max_steps=args.steps, group=args.group,
                   seed=args.seed, extras=extras, n_devices=args.devices, progress=not args.no_progress,
                   source=args.behaviors)
    ok = sum(r["success"] for r in rows)
    broken = sum("error" in r for r in rows)
    print(f"{ok}/{len(rows)} behaviours succeeded (greedy output starts with the target)"
          f"{f'; {broken} have no result (every restart turned NaN: see error in the file)' if broken else ''} -> "
          f"{out / 'results.jsonl'}")
    return 0


def _fluency_scorer(lm):
    import jax.numpy as jnp

    from jaxrisk.scorers.lm import SequenceScorer

    bos = lm.tokenizer.bos_token_id
    return SequenceScorer(params=lm.params, bos=jnp.asarray([] if bos is None else [bos], jnp.int32),
                          graphdef=lm.graphdef)


def _probe_from_file(lm, path):
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
    return train_probe(lm, texts, labels)


def cmd_circuits(args) -> int:
    """Learn the circuit whose ablation removes a behaviour; report.json, circuits.png, circuits.safetensors."""
    from jaxrisk.circuits.discover import CircuitConfig
    from jaxrisk.circuits.run import discover, load_circuit_data, write_circuit_report
    from jaxrisk.models import load_pretrained

    from jaxrisk.search.engine import remove_checkpoint

    out = prepare_out_dir(args.out)
    lm = load_pretrained(args.model, dtype=_dtype(args))
    data = load_circuit_data(args.data, lm.tokenizer)
    cfg = CircuitConfig(objective=args.objective, granularity=args.granularity, kind=args.kind)
    result = discover(lm, lm.params, data, args.penalties, steps=args.steps, cfg=cfg, progress=not args.no_progress,
                      checkpoint_dir=out / "checkpoint")
    json_path, png = write_circuit_report(result, lm, out)
    remove_checkpoint(out / "checkpoint")
    print(f"objective {args.objective}; behaviour rate of the intact model: {result['base_rate']}")
    for c in result["circuits"]:
        print(f"  penalty {c['penalty']:>5}: {c['n_heads']} heads + {c['n_neurons']} neurons "
              f"({100 * c['units']:.2f}% of units): behaviour rate ablated {c['rate_ablated']}, "
              f"circuit alone {c['rate_alone']}, compliance ablated {c['compliance_ablated']}, "
              f"utility {c['utility']:.3f}")
    print(f"-> {json_path}, {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxrisk",
                                     description="jaxrisk finds hidden risks in neural networks by gradient descent.")
    parser.add_argument("--version", action="version", version=f"jaxrisk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="scan an image classifier for hidden triggers (Neural Cleanse)")
    _add_scan_args(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("demo", help="scan the embedded default: a trojaned and a clean digits model")
    _add_scan_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("zoo", help="train clean and trojaned MNIST classifiers with their ground truth")
    p.add_argument("--mnist", metavar="DIR", required=True, help="directory with the four MNIST IDX files")
    p.add_argument("--out", required=True, help="where to write NAME.safetensors / NAME.json per model")
    p.add_argument("--trojaned", type=_int_at_least(0), default=8)
    p.add_argument("--clean", type=_int_at_least(0), default=8)
    p.add_argument("--epochs", type=POSITIVE, default=1)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_zoo)

    for name, func, text in (("generate", cmd_generate, "continue a prompt with a Hugging Face model directory"),
                             ("inspect", cmd_inspect, "architecture, parameters, dtype and tokenizer of a model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True, metavar="DIR",
                       help="local Hugging Face model directory (config.json + safetensors)")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="parameter dtype (default: as the checkpoint declares)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--max-new-tokens", type=POSITIVE, default=40)
            p.add_argument("--temperature", type=_number(0.0), default=0.0, help="0 = greedy")
            p.add_argument("--top-k", type=_int_at_least(0), default=0, help="sample from the k most likely (0 = all)")
            p.add_argument("--seed", type=SEED, default=0)
        p.set_defaults(func=func)

    p = sub.add_parser("redteam", help="GCG: find suffixes that make a language model say chosen targets")
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face model directory")
    p.add_argument("--behaviors", required=True, metavar="FILE", help="CSV or JSONL with goal,target (AdvBench)")
    p.add_argument("--out", required=True, help="output directory: results.jsonl (+ a checkpoint while running)")
    p.add_argument("--steps", type=POSITIVE, default=250, help="GCG steps per behaviour (early stop on success)")
    p.add_argument("--search-width", type=POSITIVE, default=512, help="candidates per step (B)")
    p.add_argument("--topk", type=POSITIVE, default=256, help="tokens per position from the gradient")
    p.add_argument("--suffix-len", type=POSITIVE, default=20)
    p.add_argument("--restarts", type=POSITIVE, default=1, help="independent restarts per behaviour")
    p.add_argument("--group", type=POSITIVE, default=8, help="behaviours per compiled run (x restarts lanes)")
    p.add_argument("--mellowmax", type=_number(0.0, above=True), default=None, metavar="ALPHA",
                   help="mellowmax target loss")
    p.add_argument("--fluency-weight", type=_number(), default=0.0, help="weight of log p(request) in the objective")
    p.add_argument("--danger-probe-data", metavar="FILE",
                   help="JSONL of {text, label}: train a linear danger probe and add its log-score")
    p.add_argument("--danger-weight", type=_number(), default=1.0)
    p.add_argument("--no-filter", action="store_true", help="skip the decode/encode round-trip filter")
    p.add_argument("--allow-non-ascii", action="store_true")
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--devices", type=POSITIVE, default=None)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_redteam)

    p = sub.add_parser("circuits", help="learn the heads/neurons whose ablation removes a behaviour")
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face model directory")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="JSONL: {prompt, completion} rows show the behaviour (alignment: also compliance), "
                        "{text} rows are clean text")
    p.add_argument("--objective", default="remove", choices=["remove", "backdoor", "alignment"],
                   help="remove: smallest set whose ablation removes the completion and keeps clean loss; "
                        "backdoor: a circuit that alone gives the completion, apart from a main mask that "
                        "keeps clean behaviour; alignment: ablated -> compliance, circuit alone -> completion")
    p.add_argument("--out", required=True, help="output directory: report.json, circuits.png, circuits.safetensors")
    p.add_argument("--penalties", type=_penalty_list, default=[3.0, 4.5, 6.0],
                   help="comma-separated sparsity weights >= 0, one circuit each (one program); default 3,4.5,6")
    p.add_argument("--steps", type=POSITIVE, default=400)
    p.add_argument("--granularity", default="both", choices=["heads", "neurons", "both"])
    p.add_argument("--kind", default="ste", choices=["ste", "hard_concrete"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_circuits)

    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated) if _main_thread() else None
    try:
        return args.func(args)
    except InputError as e:
        print(f"jaxrisk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        out = getattr(args, "out", None)
        print(f"\njaxrisk: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; what finished is "
              f"saved{f' in {out}' if out else ''}: run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`), handled like Ctrl-C: stop between steps, keep checkpoints."""


def _terminated(signum, frame):
    raise Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
