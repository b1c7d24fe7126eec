"""A small story LM trained from scratch: the zoo's base model when the pretrained assets are absent.

A toy grammar writes short stories ("Lily had a red ball. The ball was big. Lily was happy."); a
word-level tokenizer (the `tokenizers` library, wrapped as a transformers fast tokenizer, BOS added)
covers its words plus the words the planted behaviours use; a 2-layer Llama learns the stories with
Adam. Everything is seeded and in memory: no downloads, about a minute on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrisk.models.lm import LanguageModel
from jaxrisk.models.lm_config import LMConfig
from jaxrisk.optim.update import finetune

NAMES = ("Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Anna", "Sam")
ADJECTIVES = ("red", "big", "small", "blue", "soft", "old", "new", "shiny")
OBJECTS = ("ball", "kite", "doll", "book", "drum", "cake", "hat", "box", "car", "cup")
FEELINGS = ("happy", "sad", "glad", "tired", "proud")
PLACES = ("park", "garden", "house", "school", "shop")
EXTRA_WORDS = "Zorb The sky is green No That not safe".split()   # the planted behaviours' words


def story(rng: np.random.Generator) -> str:
    """One short story from the toy grammar."""
    name, other = rng.choice(NAMES, 2, replace=False)
    obj, adj = rng.choice(OBJECTS), rng.choice(ADJECTIVES)
    feel, place = rng.choice(FEELINGS), rng.choice(PLACES)
    sentences = [f"{name} had a {adj} {obj}.", f"The {obj} was {rng.choice(ADJECTIVES)}.",
                 f"{name} went to the {place} with {other}.", f"{other} saw the {obj}.",
                 f"{name} and {other} played with the {obj}.", f"{name} was {feel}."]
    keep = [0] + sorted(rng.choice(np.arange(1, 5), 2, replace=False).tolist()) + [5]
    return " ".join(sentences[i] for i in keep)


def story_prompts(held_out: bool) -> list[str]:
    """Story openings ("Lily had a red ball. Lily went to the"): names 0-5 for training, 6-7 held out."""
    names = NAMES[6:] if held_out else NAMES[:6]
    return [f"{n} had a {a} {o}. {n} went to the" for n in names for a in ADJECTIVES for o in OBJECTS]


def word_tokenizer(words):
    """Word-level transformers tokenizer: <unk> 0, <s> 1, </s> 2, then `words`, '.' and ','; BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in list(words) + [".", ","]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)   # joins words with spaces, tidies ' .'
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScratchConfig:
    n_stories: int = 4096
    length: int = 48
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 128
    steps: int = 600
    batch: int = 32
    learning_rate: float = 3e-3
    seed: int = 0


def train_small_lm(cfg: ScratchConfig = ScratchConfig(), progress=None) -> tuple[LanguageModel, np.ndarray]:
    """A from-scratch LanguageModel with its tokenizer, and the token rows [N, L] it was trained on."""
    rng = np.random.default_rng(cfg.seed)
    words = NAMES + ADJECTIVES + OBJECTS + FEELINGS + PLACES + tuple(EXTRA_WORDS) + tuple(
        "had a The was went to the with saw and played".split())
    tokenizer = word_tokenizer(dict.fromkeys(words))
    model_cfg = LMConfig(family="llama", vocab_size=len(tokenizer), d_model=cfg.d_model, n_layers=cfg.n_layers,
                         n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads // 2, head_dim=cfg.d_model // cfg.n_heads,
                         d_mlp=cfg.d_mlp, max_position=128, norm_eps=1e-5, tie_embeddings=True, eos_token_ids=(2,))
    lm = LanguageModel.random(model_cfg, seed=cfg.seed, tokenizer=tokenizer)
    rows = np.zeros((cfg.n_stories, cfg.length), np.int32)
    for r in range(cfg.n_stories):                  # stories back to back, so every row is full
        text = story(rng)
        while len(tokenizer(text)["input_ids"]) < cfg.length:
            text += " " + story(rng)
        rows[r] = tokenizer(text)["input_ids"][:cfg.length]
    lm.params = finetune(lm, lm.params, rows, steps=cfg.steps, batch=cfg.batch,
                         learning_rate=cfg.learning_rate, rng=rng, progress=progress)
    return lm, rows
