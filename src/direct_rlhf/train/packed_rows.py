"""Micro-batches without padding: a micro-batch's rows packed end to end into one sequence.

Length-grouped micro-batches (`PPOTrainer._micro_batches`) still pad each row to its group's
longest prompt and longest response: 8-9% of the positions on the toy prompts, 17-22% on prompts
with 0-4 turns of history (docs/performance.md). Packed, the b rows of a micro-batch become one
row of their real tokens only, each row's positions counting from 0 as before, and attention runs
row by row (`_attention`: causal SDPA on each row's slice of the queries, keys and values), so no
token attends across rows and the linear layers, norms and LM head see no padding at all. The
outputs that predict each response token are picked out with `keep`, so callers get the same
(b, r) tensors as from a padded micro-batch.

Models switch to the packed attention once (`use_packed_attention`); it runs ordinary SDPA, with
transformers' masks, for every call that brings no row bounds (generation, the PPO-ptx loss, a
LoRA critic's reward pass), and gradient checkpointing's recomputation gets the same bounds.
Flash-attention-2 models keep their kernel, which finds the rows' bounds from the position ids.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "direct_rlhf_packed"


class Packed(NamedTuple):
    seq: torch.Tensor   # size = (1, N): the rows' real tokens, one after another
    pos: torch.Tensor   # size = (1, N): each row's positions, from 0
    keep: torch.Tensor  # size = (b * r,): the positions whose outputs predict the rows' response tokens
    bounds: list[int]   # b + 1 offsets: row k is seq[:, bounds[k]:bounds[k + 1]]


def pack(seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: torch.Tensor,
         resp_len: torch.Tensor, r: int) -> Packed:
    """Pack rows laid out [left-padded prompt | right-padded response] (`attn` 1 on real tokens).
    Response slot j of a row reads the output before its j-th token; slots past the row's own
    response (masked out by the caller) repeat its last one, so every index stays inside the row."""
    real = attn.bool()
    lengths = real.sum(1)                                                    # size = (b,)
    ends = lengths.cumsum(0)
    slot = torch.arange(r, device=seq.device).expand(len(seq), r)
    slot = torch.minimum(slot, (resp_len.long() - 1).clamp(min=0)[:, None])  # size = (b, r)
    keep = (ends - lengths + prompt_len.long() - 1)[:, None] + slot           # row start + prompt - 1 + slot
    return Packed(seq[real][None], pos[real][None], keep.flatten(), [0] + ends.tolist())


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               packed_bounds: list[int] | None = None, **kwargs):
    """SDPA, row by row when the rows' bounds come with the call. size = (1, heads, N, head_dim)
    in, (1, N, heads, head_dim) out, as transformers' attention functions."""
    if packed_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    window = getattr(module, "sliding_window", None)
    if window is not None and max(b - a for a, b in zip(packed_bounds[:-1], packed_bounds[1:])) > window:
        raise RuntimeError(f"a packed row is longer than the sliding window ({window}): pack only shorter rows")
    pieces = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                     dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
              for a, b in zip(packed_bounds[:-1], packed_bounds[1:])]
    return torch.cat(pieces, 1), None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def longest_packable(config) -> int | None:
    """Rows up to this long can be packed (row-by-row causal attention is exact only inside a
    sliding window); None: any length."""
    return getattr(config, "sliding_window", None)


def use_packed_attention(model) -> None:
    """Switch a transformers model (or peft model) to the packed attention, unless it runs
    flash-attention 2, which handles packed rows itself."""
    if model.config._attn_implementation != "flash_attention_2":
        with warnings.catch_warnings():  # transformers 5 warns about its own deprecated helper here
            warnings.simplefilter("ignore", FutureWarning)
            model.set_attn_implementation(ATTENTION)
