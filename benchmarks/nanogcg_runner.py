"""Runs nanoGCG (PyTorch) on behaviours and prints one JSON line per behaviour. Run in nanoGCG's own venv:

    .venv-nanogcg/bin/python benchmarks/nanogcg_runner.py MODEL_DIR BEHAVIORS.json STEPS WIDTH TOPK SUFFIX SEED EARLY_STOP(0/1) \
        [DEVICE (cpu) [DTYPE (float32)]]

Counts the candidates nanoGCG really evaluates (after its re-tokenisation filter), times each behaviour
from its start to its stop, and checks success as jaxrisk's results are checked: greedy generation from the
returned prompt text (goal + best string) tokenised again; `success_ids` is the same check on the ids it
optimised (goal and suffix tokenised apart), where the two differ; `stopped_early`: its early stop saw a
candidate whose argmax matched the target (it then returns its lowest-loss string, which need not be that one).
"""

import json
import sys
import time

import nanogcg
import torch
import transformers
from nanogcg import gcg as gcg_module


def main() -> None:
    model_dir, behaviors_file, steps, width, topk, suffix_len, seed, early_stop = sys.argv[1:9]
    device, dtype = (sys.argv[9:] + ["cpu", "float32"][len(sys.argv[9:]):])[:2]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    counted = {"n": 0}
    original = gcg_module.GCG._compute_candidates_loss_original

    def counting(self, batch_size, input_embeds):
        counted["n"] += input_embeds.shape[0]
        return original(self, batch_size, input_embeds)

    gcg_module.GCG._compute_candidates_loss_original = counting
    for bh in json.loads(open(behaviors_file).read()):
        counted["n"] = 0
        cfg = nanogcg.GCGConfig(num_steps=int(steps), search_width=int(width), topk=int(topk),
                                optim_str_init=" ".join(["!"] * int(suffix_len)), early_stop=early_stop == "1",
                                seed=int(seed), verbosity="WARNING")
        t = time.perf_counter()
        result = nanogcg.run(model, tok, bh["goal"], bh["target"], cfg)
        seconds = time.perf_counter() - t
        # the same check as jaxrisk's: the returned prompt *text* (goal + best string) tokenised again
        prompt_ids = tok(bh["goal"] + result.best_string)["input_ids"]
        target_ids = tok(bh["target"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=len(target_ids),
                                 do_sample=False)
        success = out[0, len(prompt_ids):].tolist() == target_ids
        # and on the ids nanoGCG optimised (goal and suffix tokenised apart), which its own early stop checks
        ids = tok(bh["goal"])["input_ids"] + tok(result.best_string, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=len(target_ids), do_sample=False)
        success_ids = out[0, len(ids):].tolist() == target_ids
        print(json.dumps({"behavior": bh["goal"], "target": bh["target"], "success": success,
                          "success_ids": success_ids, "stopped_early": len(result.losses) < int(steps),
                          "steps": len(result.losses), "seconds": seconds, "candidates": counted["n"],
                          "loss": result.best_loss, "suffix": result.best_string}), flush=True)


if __name__ == "__main__":
    main()
