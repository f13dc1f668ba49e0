"""A byte-level BPE tokenizer trained on the toy corpus, saved in Hugging Face format.

Byte-level so that any text round-trips exactly (the chat format's "\n\n" included), trained with
the `tokenizers` library, wrapped in `PreTrainedTokenizerFast` so that plain
`AutoTokenizer.from_pretrained(dir)` loads it with no project code.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS,
                                   unk_token=None, clean_up_tokenization_spaces=False,
                                   model_max_length=1_000_000)
