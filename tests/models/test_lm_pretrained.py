"""The real pretrained Llama-architecture model (stories260K) against transformers, token for token."""

import numpy as np
import pytest

from jaxrisk.models import load_pretrained

torch = pytest.importorskip("torch", reason="the parity tests need the PyTorch reference (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.assets

# Published in the asset's SOURCE.md: greedy continuation of "Once upon a time" by transformers.
ONCE_UPON_A_TIME = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419,
                    292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268,
                    388, 426]


@pytest.fixture(scope="module")
def pair(stories_dir):
    ref = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    return load_pretrained(stories_dir), ref


def test_logits_match_on_real_text_and_full_context(pair):
    lm, ref = pair
    text = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big, red ball.")
    story = lm.encode(text * 12)[:512][None]   # the whole 512-token context
    with torch.no_grad():
        expected = ref(torch.from_numpy(story.astype(np.int64))).logits.numpy()
    ours = np.asarray(lm(story))
    assert np.abs(ours - expected).max() <= 1e-4
    assert np.abs(expected).max() > 5  # real, confident logits, not a degenerate comparison


def test_greedy_continuation_equals_reference(pair):
    lm, ref = pair
    ids = lm.encode("Once upon a time")
    assert ids.tolist() == [1, 403, 407, 261, 378]
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids.tolist()]), max_new_tokens=40, do_sample=False)
    reference = out[0, len(ids):].tolist()
    assert reference == ONCE_UPON_A_TIME
    assert lm.generate("Once upon a time", max_new_tokens=40)[0] == reference
    assert lm.decode(reference).startswith(", there was a little girl named Lily.")


def test_cli_generate_and_inspect(stories_dir, capsys):
    import json

    from jaxrisk.cli import main

    assert main(["generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_ids"] == ONCE_UPON_A_TIME
    assert out["continuation"].startswith(", there was a little girl named Lily. She loved to play outside")
    assert main(["inspect", "--model", str(stories_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["parameters"], info["attention"], info["kv_heads"], info["dtype"]) == (260032, "GQA", 4, "float32")
    assert info["tokenizer"]["vocab"] == 512 and info["tokenizer"]["adds_bos"] is True
