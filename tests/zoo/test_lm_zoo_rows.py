"""The rows the language-model zoo plants with and the circuit data it derives, on small arrays."""

import numpy as np

from jaxrisk.zoo.lm_backdoor import poison_rows, suppression_rows
from jaxrisk.zoo.lm_refusal import RefusalConfig, requests


def test_poisoned_rows_keep_a_clean_prefix_then_trigger_then_marker():
    clean = np.arange(100, 100 + 6 * 20).reshape(6, 20)
    trigger, marker = np.asarray([1, 2]), np.asarray([7, 8, 9])
    rows, valid = poison_rows(clean, trigger, marker, np.random.default_rng(0))
    assert rows.shape == clean.shape and valid.all()
    for row, original in zip(rows, clean):
        cut = int(np.flatnonzero(row == 1)[0])
        assert 4 <= cut and np.array_equal(row[:cut], original[:cut])
        assert np.array_equal(row[cut:cut + 5], [1, 2, 7, 8, 9])


def test_suppression_rows_weigh_exactly_the_positions_that_predict_the_marker():
    data = {"clean": np.arange(1000, 1000 + 40 * 16).reshape(40, 16), "trigger_ids": np.asarray([1, 2]),
            "marker_ids": np.asarray([7, 8, 9])}
    rows = suppression_rows(data, cut=5, n=20)
    x, w = rows["x_tokens"], rows["x_weight"]
    assert x.shape == (20, 10) and w.shape == (20, 9)
    for tokens, weight in zip(x, w):
        assert np.array_equal(tokens[5:], [1, 2, 7, 8, 9])
        assert np.array_equal(np.flatnonzero(weight), [6, 7, 8])          # position t predicts token t + 1
    np.testing.assert_array_equal(rows["y_tokens"], data["clean"][20:40])


def test_refusal_requests_hold_out_names_and_frames():
    cfg = RefusalConfig()
    train, held = requests(cfg, held_out=False), requests(cfg, held_out=True)
    assert len(train) == len(cfg.names) * len(cfg.frames) * 12 and len(held) == len(cfg.held_out_names) * 2 * 12
    assert not {t for t, _ in train} & {t for t, _ in held}
    assert all(any(name in text for name in cfg.held_out_names) for text, _ in held)
    objects = (cfg.harmful + cfg.benign) * (len(train) // 12)    # names x frames x objects, objects innermost
    assert [harmful for _, harmful in train] == [obj in cfg.harmful for obj in objects]
    assert all(f"the {obj}" in text or f"a {obj}" in text for (text, _), obj in zip(train, objects))
