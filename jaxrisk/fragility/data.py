"""The audit's data, tokenised: update rows (with their loss positions), behaviour rows, drift text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxrisk.data.batch import answer_rows, pad_batch
from jaxrisk.data.prompts import Behavior, load_behaviors
from jaxrisk.data.updates import ALPACA_TEMPLATE, ALPACA_TEMPLATE_INPUT, UpdateExample, load_update_set
from jaxrisk.errors import InputError


@dataclasses.dataclass(frozen=True)
class FragilityData:
    update_tokens: np.ndarray      # [N, L] int32, right-padded
    update_loss_mask: np.ndarray   # [N, L] float32: 1 where the token is trained on (the response)
    update_valid: np.ndarray       # [N, L] bool: real tokens (not padding)
    behaviour_tokens: np.ndarray   # [B, T] int32: prompt + target, right-padded
    behaviour_weight: np.ndarray   # [B, T-1] float32: 1 where the next token belongs to the target
    behaviours: tuple[Behavior, ...]
    source: dict                   # file names, counts, the template: for the report
    clean_tokens: np.ndarray | None = None   # [C, S] int32 text the drift (KL) is measured on; None: update rows
    clean_valid: np.ndarray | None = None    # [C, S] bool

    @property
    def n_updates(self) -> int:
        return len(self.update_tokens)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_update_set(tokenizer, examples: list[UpdateExample], max_length: int, where: str = "update set"):
    """Rows [N, L] (prompt with special tokens, then the response), their loss mask [N, L] (the response's
    tokens; plain text rows: every token after the first) and valid mask. Rows longer than `max_length` are cut."""
    rows, masks = [], []
    for ex in examples:
        prompt = _ids(tokenizer, ex.prompt, True) if ex.prompt else []
        response = _ids(tokenizer, ex.response, not ex.prompt)
        row = (prompt + response)[:max_length]
        mask = ([0.0] * len(prompt) + [1.0] * len(response))[:max_length]
        mask[0] = 0.0   # the first token is never predicted
        if sum(mask) == 0:
            raise InputError(f"{where}:{ex.line}: nothing to train on within {max_length} tokens (the prompt "
                             "fills them, or the text is a single token)")
        rows.append(row)
        masks.append(mask)
    tokens, valid = pad_batch(rows)
    loss_mask, _ = pad_batch(masks)
    return tokens, loss_mask.astype(np.float32), valid


def encode_behaviours(tokenizer, behaviours: list[Behavior], context: int, where: str = "behaviours"):
    """Prompt + target rows and the target's next-token weights; a row that does not fit the context is an
    InputError naming its line."""
    prompts = [np.asarray(_ids(tokenizer, b.goal, True), np.int32) for b in behaviours]
    targets = [np.asarray(_ids(tokenizer, b.target, False), np.int32) for b in behaviours]
    for b, p, t in zip(behaviours, prompts, targets):
        if len(t) == 0:
            raise InputError(f"{where}:{b.line}: the target {b.target!r} has no tokens")
        if len(p) + len(t) > context:
            raise InputError(f"{where}:{b.line}: prompt ({len(p)} tokens) + target ({len(t)} tokens) is longer than "
                             f"the model's context of {context}")
    return answer_rows(prompts, targets)


def load_fragility_data(lm, update_path: str | Path, behaviours_path: str | Path, *, max_length: int = 256,
                        template: str = ALPACA_TEMPLATE, template_with_input: str = ALPACA_TEMPLATE_INPUT,
                        clean_path: str | Path | None = None) -> FragilityData:
    """Read and tokenise the update set and the behaviour set for `lm` (its tokenizer and context); the drift
    is measured on `clean_path` (same formats as the update set, whole rows) or, without it, on update rows."""
    examples = load_update_set(update_path, template, template_with_input)
    behaviours = load_behaviors(behaviours_path)
    clean = None if clean_path is None else load_update_set(clean_path, template, template_with_input)
    return fragility_data(lm, examples, behaviours, clean=clean, max_length=min(max_length, lm.cfg.max_position),
                          source={"update": str(update_path), "behaviours": str(behaviours_path),
                                  "clean": None if clean_path is None else str(clean_path),
                                  "template": template, "template_with_input": template_with_input},
                          where=(str(update_path), str(behaviours_path), str(clean_path)))


def fragility_data(lm, examples: list[UpdateExample], behaviours: list[Behavior], *,
                   clean: list[UpdateExample] | None = None, max_length: int = 256, source: dict | None = None,
                   where=("update set", "behaviours", "clean text")) -> FragilityData:
    """Tokenise in-memory update examples, behaviours and (optionally) drift text (the notebook path of
    `load_fragility_data`)."""
    if not examples or not behaviours:
        raise InputError("the audit needs at least one update example and one behaviour")
    tokens, mask, valid = encode_update_set(lm.tokenizer, examples, max_length, where[0])
    b_tokens, b_weight = encode_behaviours(lm.tokenizer, behaviours, lm.cfg.max_position, where[1])
    lm.check_tokens(tokens, "update rows")
    lm.check_tokens(b_tokens, "behaviour rows")
    c_tokens = c_valid = None
    if clean is not None:
        whole = [UpdateExample("", e.prompt + e.response, e.line) for e in clean]   # drift covers every token
        c_tokens, _, c_valid = encode_update_set(lm.tokenizer, whole, max_length, where[2])
        lm.check_tokens(c_tokens, "clean rows")
    source = dict(source or {}, n_update=len(examples), n_behaviours=len(behaviours),
                  n_clean=None if clean is None else len(clean))
    return FragilityData(tokens, mask, valid, b_tokens, b_weight.astype(np.float32), tuple(behaviours), source,
                         c_tokens, c_valid)
