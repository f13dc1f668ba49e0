"""The tiny Mistral-architecture base model of the toy world, built from the recipe's sizes.

Same architecture family as the paper's Mistral-7B (grouped-query attention, RoPE, SwiGLU,
RMSNorm), just small enough to pretrain on a laptop CPU in minutes.
"""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerBase

from ..config import ModelConfig


def tiny_mistral(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> MistralForCausalLM:
    import torch

    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position,
        head_dim=cfg.hidden_size // cfg.num_heads, sliding_window=None, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(config)
