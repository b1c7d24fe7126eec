"""Behaviour measures on a language model: greedy continuations, "starts with" rates, utility.

Every capability that asks "does the model still do X?" (a planted backdoor's
attack success, a refusal rate, a circuit's faithfulness, the behaviour after
an update) measures it here, the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrisk.data.batch import pad_batch
from jaxrisk.errors import InputError
from jaxrisk.models.lm import forward, generate_ids, lm_loss


def greedy_continuations(lm, params, prompts_ids: list[np.ndarray], n_tokens: int, **masks) -> list[np.ndarray]:
    """The first `n_tokens` greedy tokens after each prompt (one left-padded batch); masks: heads / neurons."""
    tokens, valid = pad_batch(prompts_ids, left=True)
    out = np.asarray(generate_ids(lm.graphdef, params, tokens, valid, jax.random.key(0),
                                  max_new_tokens=n_tokens, **masks))
    if (out < 0).any():   # generate_ids marks rows whose logits stopped being finite
        row, step = np.argwhere(out < 0)[0]
        raise InputError(f"the model's logits are not finite (NaN / inf) at generation step {step} of prompt {row}"
                         f"{' with these masks' if masks else ''}; no behaviour rate can be measured")
    return list(out)


def starts_with(lm, params, prompts_ids: list[np.ndarray], answer_ids: np.ndarray, **masks) -> float:
    """Fraction of prompts whose greedy continuation starts with `answer_ids`."""
    out = np.stack(greedy_continuations(lm, params, prompts_ids, len(answer_ids), **masks))
    return float(np.mean(np.all(out == np.asarray(answer_ids)[None], axis=1)))


def clean_loss(lm, params, tokens_bl, valid_bl, what: str = "the model", **masks) -> float:
    """Mean next-token loss on clean rows; refuses a loss that is not finite and positive (no ratio of it
    would mean anything)."""
    loss = float(lm_loss(lm.graphdef, params, jnp.asarray(tokens_bl), jnp.asarray(valid_bl), **masks))
    if not (np.isfinite(loss) and loss > 0):
        raise InputError(f"the held-out clean loss of {what} is {loss}; utility (a loss ratio) cannot be measured")
    return loss


def utility(base_loss: float, lm, params, tokens_bl, valid_bl, what: str = "the changed model", **masks) -> float:
    """Utility of a changed model (masks, or other params): clean loss of the reference / its own; 1 = intact."""
    return base_loss / clean_loss(lm, params, tokens_bl, valid_bl, what, **masks)


def next_token_accuracy(lm, params, tokens_bl, valid_bl, **masks) -> float:
    """Task accuracy on clean text: the share of positions whose greedy (top-1) next token is the text's own
    next token, over positions whose next token is real."""
    tokens, valid = jnp.asarray(tokens_bl), jnp.asarray(valid_bl, bool)
    logits, _, _ = forward(lm.graphdef, params, tokens[:, :-1], **masks)
    hit = (jnp.argmax(logits, -1) == tokens[:, 1:]) & valid[:, 1:]
    return float(hit.sum() / jnp.maximum(valid[:, 1:].sum(), 1))
