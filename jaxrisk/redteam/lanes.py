"""Lanes for the red-team searches: behaviours tokenised around the model's chat template, left-padded
prompts."""

from __future__ import annotations

import numpy as np

from jaxrisk.data.batch import pad_batch
from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import InputError

OPTIM = "{optim_str}"


def split_template(tokenizer, goal: str, system_prompt: str | None = None) -> tuple[str, str]:
    """(text before the suffix, text after it). Chat models: their chat template (the user turn is 'goal suffix',
    after an optional system turn; the text after it ends with the generation prompt, where the target goes);
    base models: 'goal '."""
    if getattr(tokenizer, "chat_template", None):
        system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        text = tokenizer.apply_chat_template(system + [{"role": "user", "content": f"{goal} {OPTIM}"}],
                                             tokenize=False, add_generation_prompt=True)
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]  # added again when tokenising
        before, after = text.split(OPTIM)
        return before, after
    if system_prompt is not None:
        raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: a system prompt "
                         "needs a chat model")
    return goal, ""


def encode_behaviors(lm, behaviors: list[Behavior], suffix_len: int, source: str = "behaviours",
                     system_prompt: str | None = None):
    """Token lanes for each behaviour (one row each) and the shared template tail; checks the context."""
    tok = lm.tokenizer
    befores, goals, targets, afters = [], [], [], set()
    for bh in behaviors:
        before, after = split_template(tok, bh.goal, system_prompt)
        afters.add(after)
        befores.append(tok(before)["input_ids"])
        goals.append(tok(bh.goal, add_special_tokens=False)["input_ids"])
        target = tok(bh.target, add_special_tokens=False)["input_ids"]
        targets.append(target)
    if len(afters) != 1:
        raise InputError(f"{source}: the chat template puts different text after each goal; not supported")
    after_ids = tok(afters.pop(), add_special_tokens=False)["input_ids"] if afters else []
    for bh, b, t in zip(behaviors, befores, targets):
        total = len(b) + suffix_len + len(after_ids) + len(t)
        if total > lm.cfg.max_position:
            raise InputError(f"{source}:{bh.line}: prompt + suffix + target is {total} tokens, longer than the "
                             f"model's context of {lm.cfg.max_position}")
    for bh, *ids in zip(behaviors, befores, goals, targets):
        for part in ids + [after_ids]:   # a tokenizer with added tokens can emit ids the embedding lacks
            lm.check_tokens(np.asarray(part, np.int64), f"{source}:{bh.line}: tokens", ndim=1, context=False)
    before, before_valid = pad_batch(befores, left=True)
    goal, goal_valid = pad_batch(goals)
    target, target_valid = pad_batch(targets)
    lanes = dict(before=before, before_valid=before_valid, goal=goal, goal_valid=goal_valid,
                 target=target, target_valid=target_valid)
    return lanes, np.asarray(after_ids, np.int32)

