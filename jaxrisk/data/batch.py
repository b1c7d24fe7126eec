"""Token batching: ragged id lists to fixed-shape arrays (padding, prompt + answer rows)."""

from __future__ import annotations

import numpy as np


def pad_batch(ids, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id lists to [B, L] int32 (on the right, or on the left for generation) with a valid mask."""
    width = max(1, max(len(i) for i in ids))
    tokens = np.zeros((len(ids), width), np.int32)
    valid = np.zeros((len(ids), width), bool)
    for r, i in enumerate(ids):
        cols = slice(width - len(i), width) if left else slice(0, len(i))
        tokens[r, cols], valid[r, cols] = i, True
    return tokens, valid


def answer_rows(prompts, answers) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt + answer rows [N, L] and next-token weights [N, L-1], 1 where the next token
    belongs to the answer: the rows a loss on the answer alone needs."""
    tokens, _ = pad_batch([np.concatenate([p, a]) for p, a in zip(prompts, answers)])
    weight = np.zeros((len(tokens), tokens.shape[1] - 1), np.float32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        weight[i, len(p) - 1:len(p) + len(a) - 1] = 1.0
    return tokens, weight
