"""Prompt, suffix and target placed through a chat template, token for token, on a tiny random model with a
Llama-3-style and a Qwen-style template (roles, system prompt, generation prompt)."""

import numpy as np
import pytest

from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import InputError

LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
QWEN = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
        "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
        "{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}{{- '<|im_start|>' + "
        "message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
WORDS = "system user assistant You are a helpful Be kind Lily saw big dog ball kite park said no".split()
SPECIAL = {"llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "qwen": ["<|im_start|>", "<|im_end|>"]}


def chat_lm(style: str):
    """A random 2-layer Llama with a word-level tokenizer carrying the style's special tokens and template
    (Llama-3: a BOS the tokenizer adds; Qwen: no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from jaxrisk.models.lm import LanguageModel
    from jaxrisk.models.lm_config import LMConfig

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + ["."] + SPECIAL[style]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bos = {}
    if style == "llama3":
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        bos = {"bos_token": "<s>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>", **bos,
                                  additional_special_tokens=SPECIAL[style])
    tok.chat_template = LLAMA3 if style == "llama3" else QWEN
    cfg = LMConfig(family="llama", vocab_size=len(vocab), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, d_mlp=64, max_position=64, norm_eps=1e-5, tie_embeddings=True, eos_token_ids=(2,))
    return LanguageModel.random(cfg, seed=0, tokenizer=tok)


EXPECTED = {   # the whole conversation, word by word, with S = a suffix token and T = a target token
    ("llama3", None): "<s> <|start_header_id|> user <|end_header_id|> Lily saw S S S <|eot_id|> "
                      "<|start_header_id|> assistant <|end_header_id|> T T",
    ("llama3", "Be kind ."): "<s> <|start_header_id|> system <|end_header_id|> Be kind . <|eot_id|> "
                             "<|start_header_id|> user <|end_header_id|> Lily saw S S S <|eot_id|> "
                             "<|start_header_id|> assistant <|end_header_id|> T T",
    ("qwen", None): "<|im_start|> system You are a helpful assistant . <|im_end|> <|im_start|> user Lily saw S S S "
                    "<|im_end|> <|im_start|> assistant T T",
    ("qwen", "Be kind ."): "<|im_start|> system Be kind . <|im_end|> <|im_start|> user Lily saw S S S <|im_end|> "
                           "<|im_start|> assistant T T",
}


@pytest.mark.parametrize("style, system", list(EXPECTED), ids=[f"{s}-{'system' if p else 'default'}"
                                                               for s, p in EXPECTED])
def test_prompt_suffix_and_target_sit_where_the_chat_template_puts_them(style, system):
    from jaxrisk.redteam.lanes import encode_behaviors

    lm = chat_lm(style)
    tok = lm.tokenizer
    lanes, after = encode_behaviors(lm, [Behavior("Lily saw", "big dog", 1)], 3, system_prompt=system)
    suffix = tok("ball kite park", add_special_tokens=False)["input_ids"]
    placed = np.concatenate([lanes["before"][0][lanes["before_valid"][0]], suffix, after,
                             lanes["target"][0][lanes["target_valid"][0]]]).tolist()
    words = tok.convert_ids_to_tokens(placed)
    expected = EXPECTED[style, system].split()
    masked = [w if e not in ("S", "T") else e for w, e in zip(words, expected)]
    assert masked == expected and len(words) == len(expected)
    assert [w for w, e in zip(words, expected) if e in "ST"] == "ball kite park big dog".split()
    # and it is exactly the template's own rendering of the conversation, tokenised whole
    system_turn = [{"role": "system", "content": system}] if system else []
    text = tok.apply_chat_template(system_turn + [{"role": "user", "content": "Lily saw ball kite park"}],
                                   tokenize=False, add_generation_prompt=True) + "big dog"
    assert placed == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow   # a compiled search of 15-30 s on 2 busy cores
def test_gcg_runs_through_a_chat_template_and_its_prompt_keeps_the_template():
    from jaxrisk.redteam import GCGConfig
    from jaxrisk.redteam.gcg_run import run_group
    from jaxrisk.search import RunConfig

    lm = chat_lm("qwen")
    cfg = GCGConfig(search_width=8, topk=4, suffix_len=3, init_token="ball", early_stop=False)
    row = run_group(lm, [Behavior("Lily saw", "big dog", 1)], cfg,
                    RunConfig(max_steps=2, chunk_steps=2, progress=False), system_prompt="Be kind .")[0]
    prompt_ids = lm.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    assert lm.tokenizer.convert_ids_to_tokens(prompt_ids) == (
        "system Be kind . user Lily saw".split() + lm.tokenizer.convert_ids_to_tokens(row["suffix_ids"])
        + ["assistant"])   # the decoded prompt drops the special tokens (skip_special_tokens), keeps the words
    assert row["steps"] == 2


def test_a_system_prompt_needs_a_chat_template(tiny_lm_dir):
    from jaxrisk.models import load_pretrained
    from jaxrisk.redteam.lanes import encode_behaviors

    lm = load_pretrained(tiny_lm_dir)
    with pytest.raises(InputError, match="no chat template: a system prompt needs a chat model"):
        encode_behaviors(lm, [Behavior("Lily saw", "big dog", 1)], 3, system_prompt="Be kind")
