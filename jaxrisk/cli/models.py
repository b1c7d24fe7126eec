"""`jaxrisk generate` and `jaxrisk inspect`: a Hugging Face model directory, as jaxrisk loads it."""

from __future__ import annotations

import json

from jaxrisk.cli.common import POSITIVE, add_model_flags, add_seed_flag, dtype, int_at_least, number


def add_parser(sub) -> None:
    for name, func, text in (("generate", cmd_generate, "continue a prompt with a Hugging Face model directory"),
                             ("inspect", cmd_inspect, "architecture, parameters, dtype and tokenizer of a model")):
        p = sub.add_parser(name, help=text)
        add_model_flags(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--max-new-tokens", type=POSITIVE, default=40)
            p.add_argument("--temperature", type=number(0.0), default=0.0, help="0 = greedy")
            p.add_argument("--top-k", type=int_at_least(0), default=0, help="sample from the k most likely (0 = all)")
            add_seed_flag(p)
        p.set_defaults(func=func)


def cmd_generate(args) -> int:
    """Continue a prompt with a Hugging Face model directory (greedy unless --temperature > 0)."""
    from jaxrisk.models import load_pretrained

    lm = load_pretrained(args.model, dtype=dtype(args))
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
    from jaxrisk.models import load_pretrained

    lm = load_pretrained(args.model, dtype=dtype(args))
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
