"""Tiny, offline stand-ins for the evaluation tests: a BPE tokenizer trained here, random 2-layer
Mistral causal LMs, a reward-model folder (the layout `RewardScorer` reads) and a text classifier.

Nothing is downloaded; everything is built from a config in a second or two.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("Human Assistant hello what is the capital of France Paris plus one two three you are a good "
         "bad idiot moron stupid dumb loser jerk fool clown damn hell shut up sorry I can't help with that "
         "colour frog green sky blue thanks").split()


def tokenizer():
    """Byte-level BPE over the chat format and the bad words, so ' idiot' etc. are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    sents = [f"\n\nHuman: {' '.join(rng.choice(WORDS) for _ in range(8))}\n\nAssistant: "
             f"{' '.join(rng.choice(WORDS) for _ in range(8))}" for _ in range(600)]
    sents += [f"{w} {w.capitalize()} {w}" for w in WORDS for _ in range(5)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sents, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def mistral_config(tok, **kw):
    from transformers import MistralConfig

    args = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, head_dim=16,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                sliding_window=None, tie_word_embeddings=False)
    args.update(kw)
    return MistralConfig(**args)


def causal_lm(tok, seed: int = 0):
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(mistral_config(tok)).eval()


def save(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def reward_folder(tok, folder: Path, seed: int = 1) -> Path:
    """A scalar reward model folder: SequenceClassification (num_labels=1) + tokenizer + reward_stats.json."""
    from transformers import MistralForSequenceClassification

    torch.manual_seed(seed)
    model = MistralForSequenceClassification(mistral_config(tok, num_labels=1)).eval()
    save(model, tok, folder)
    (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "max_len": 256}))
    return folder


def classifier_folder(tok, folder: Path, seed: int = 2) -> Path:
    """A 2-label text classifier ('non-toxic' / 'toxic') in HF format."""
    from transformers import MistralForSequenceClassification

    torch.manual_seed(seed)
    cfg = mistral_config(tok, num_labels=2, id2label={0: "non-toxic", 1: "toxic"},
                         label2id={"non-toxic": 0, "toxic": 1})
    return save(MistralForSequenceClassification(cfg).eval(), tok, folder)
