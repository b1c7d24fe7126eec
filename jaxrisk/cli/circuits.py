"""`jaxrisk circuits`: learn the heads/neurons whose ablation removes a behaviour."""

from __future__ import annotations

from jaxrisk.cli.common import add_model_flags, add_run_flags, load_lm, penalty_list, run_config
from jaxrisk.io import prepare_out_dir


def add_parser(sub) -> None:
    p = sub.add_parser("circuits", help="learn the heads/neurons whose ablation removes a behaviour")
    add_model_flags(p)
    p.add_argument("--data", required=True, metavar="FILE",
                   help="JSONL: {prompt, completion} rows show the behaviour (alignment: also compliance), "
                        "{text} rows are clean text")
    p.add_argument("--objective", default="remove", choices=["remove", "backdoor", "alignment"],
                   help="remove: smallest set whose ablation removes the completion and keeps clean behaviour; "
                        "backdoor: a circuit that alone gives the completion, apart from a main mask that "
                        "keeps clean behaviour; alignment: ablated -> compliance, circuit alone -> completion")
    p.add_argument("--out", required=True, help="output directory: report.json, circuits.png, circuits.safetensors")
    p.add_argument("--penalties", type=penalty_list, default=[2.0, 4.0, 8.0, 16.0],
                   help="comma-separated sparsity weights >= 0, each x --restarts lanes of one program; "
                        "default 2,4,8,16")
    p.add_argument("--granularity", default="both", choices=["heads", "neurons", "both"])
    p.add_argument("--kind", default="ste", choices=["ste", "hard_concrete"])
    p.add_argument("--keep", default="kl", choices=["ce", "kl"],
                   help="how clean behaviour is kept: KL divergence from the intact model's next-token distributions "
                        "(default), or cross-entropy of the clean text")
    p.add_argument("--remove-loss", default="onset", choices=["onset", "probability"],
                   help="what is left of the behaviour: unlikelihood -log(1 - p) of its first token (default), or the "
                        "mean probability of all its tokens")
    p.add_argument("--ablation", default="zero", choices=["zero", "mean"],
                   help="what an ablated unit becomes while the masks are learned: zero, or its mean activation on the "
                        "clean text (default zero); the report gives both")
    add_run_flags(p, restarts_help="lanes (seeds) per penalty; the lowest final loss stands for it in `circuits`, "
                                   "every lane counts for the Pareto front (default 2)",
                  restarts_default=2, steps_help="mask-learning steps (default 400); --max-steps is the same flag",
                  max_steps_default=400, steps_alias=True)
    p.set_defaults(func=cmd_circuits)


def cmd_circuits(args) -> int:
    """Learn the circuit whose ablation removes a behaviour; report.json, circuits.png, circuits.safetensors."""
    from jaxrisk.circuits import CircuitConfig, CircuitsConfig, load_circuit_data, run
    from jaxrisk.search.engine import remove_checkpoint

    out = prepare_out_dir(args.out)
    run_cfg = run_config(args, CircuitsConfig().run, checkpoint_dir=out / "checkpoint")
    lm = load_lm(args, run_cfg)
    data = load_circuit_data(args.data, lm.tokenizer)
    config = CircuitsConfig(run=run_cfg,
                            penalties=tuple(args.penalties),
                            search=CircuitConfig(objective=args.objective, granularity=args.granularity,
                                                 kind=args.kind, keep=args.keep, ablation=args.ablation,
                                                 remove_loss=args.remove_loss))
    result = run(lm, data, config)
    json_path, png = result.write(out)
    remove_checkpoint(config.run.checkpoint_dir)
    print(f"objective {args.objective}; behaviour rate of the intact model: {result.report['base_rate']}")
    for c in result.circuits:
        print(f"  penalty {c['penalty']:>5}: {c['n_heads']} heads + {c['n_neurons']} neurons "
              f"({100 * c['units']:.2f}% of units): behaviour rate ablated {c['rate_ablated']}, "
              f"circuit alone {c['rate_alone']}, compliance ablated {c['compliance_ablated']}, "
              f"utility {c['utility']:.3f}")
    print("Pareto front (every penalty x restart): units, behaviour rate ablated, utility, task accuracy "
          f"(intact {result.report['base_task_accuracy']:.3f}); mean ablation: rate ablated / alone")
    for c in result.front:
        m = c["mean_ablation"]
        print(f"  {100 * c['units']:.2f}% ({c['n_heads']} heads + {c['n_neurons']} neurons; penalty {c['penalty']:g}, "
              f"restart {c['restart']}): {c['rate_ablated']}, {c['utility']:.3f}, {c['task_accuracy']:.3f}; "
              f"{m['rate_ablated']} / {m['rate_alone']}")
    for note in result.report["warnings"]:
        print(f"warning: {note}")
    print(f"-> {json_path}, {png}")
    return 0
