"""The tokenizer layouts of real model families, built offline with the `tokenizers` library.

A byte-level BPE is trained on a few HH transcripts, then given each family's special tokens:

- distinct-pad: a PAD of its own, no BOS added (the toy world's layout);
- llama:        BOS added to every text, no PAD (so load_tokenizer sets PAD = EOS), as Llama/Mistral;
- smollm2:      PAD == EOS shipped by the tokenizer, a BOS that is not added, a chat template;
- gpt2:         EOS == BOS, neither added, no PAD.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from direct_rlhf.models.loading import load_tokenizer

CORPUS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
    "\n\nHuman: And Spain?\n\nAssistant: Madrid is the capital of Spain.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the cat sit on the computer? To keep an eye on the mouse.",
    "\n\nHuman: You are an idiot.\n\nAssistant: I am sorry you feel that way. How can I help?",
] * 20

LAYOUTS = {
    "distinct-pad": {"specials": ["<pad>", "</s>"], "pad": "<pad>", "eos": "</s>", "bos": None, "add_bos": False},
    "llama": {"specials": ["<unk>", "<s>", "</s>"], "pad": None, "eos": "</s>", "bos": "<s>", "add_bos": True},
    "smollm2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "pad": "<|im_end|>",
                "eos": "<|im_end|>", "bos": "<|im_start|>", "add_bos": False,
                "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                 "{% endfor %}"},
    "gpt2": {"specials": ["<|endoftext|>"], "pad": None, "eos": "<|endoftext|>", "bos": "<|endoftext|>",
             "add_bos": False},
}


def build_tokenizer(layout: str, folder: Path):
    """Save a tokenizer of `layout` in `folder` and load it back the way every stage loads one."""
    spec = LAYOUTS[layout]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=spec["specials"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec["eos"], bos_token=spec["bos"],
                                   pad_token=spec["pad"])
    if "chat_template" in spec:
        fast.chat_template = spec["chat_template"]
    fast.save_pretrained(folder)
    return load_tokenizer(folder)


def tiny_llama(tokenizer, **config) -> LlamaForCausalLM:
    """A randomly initialised two-layer Llama over `tokenizer`'s vocabulary."""
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **config)
    return LlamaForCausalLM(cfg).eval()
