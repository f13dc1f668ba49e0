"""Micro-batches without padding: a micro-batch's rows packed end to end into one sequence.

Length-grouped micro-batches (`PPOTrainer._micro_batches`) still pad each row to its group's
longest prompt and longest response: 8-9% of the positions on the toy prompts, 17-22% on prompts
with 0-4 turns of history (docs/performance.md). Packed, the b rows of a micro-batch become one
row of their real tokens only, each row's positions counting from 0 as before, so the linear
layers, norms and LM head see no padding at all. Attention (`_attention`) lays the queries, keys
and values out on a (rows, longest row) grid again, right-padded, and runs one causal SDPA call:
no token attends across rows, and a row's real tokens never see its padding, which comes after
them. The outputs that predict each response token are picked out with `keep`, so callers get the
same (b, r) tensors as from a padded micro-batch.

Models switch to the packed attention once (`use_packed_attention`); it runs ordinary SDPA, with
transformers' masks, for every call that brings no row layout (generation, the PPO-ptx loss, a
LoRA critic's reward pass), and gradient checkpointing's recomputation gets the same layout.
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


class RowGrid(NamedTuple):
    """Where a packed sequence's positions sit on a (rows, longest) grid, rows right-padded."""
    gather: torch.Tensor   # size = (rows * longest,): the packed position for each cell (past a row's end: its last)
    scatter: torch.Tensor  # size = (N,): the cell of each packed position
    rows: int
    longest: int


class Packed(NamedTuple):
    seq: torch.Tensor   # size = (1, N): the rows' real tokens, one after another
    pos: torch.Tensor   # size = (1, N): each row's positions, from 0
    keep: torch.Tensor  # size = (b * r,): the positions whose outputs predict the rows' response tokens
    grid: RowGrid       # how attention lays the rows out again


def pack(seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: torch.Tensor,
         resp_len: torch.Tensor, r: int) -> Packed:
    """Pack rows laid out [left-padded prompt | right-padded response] (`attn` 1 on real tokens).
    Response slot j of a row reads the output before its j-th token; slots past the row's own
    response (masked out by the caller) repeat its last one, so every index stays inside the row."""
    real = attn.bool()
    lengths = real.sum(1)                                                    # size = (b,)
    starts = lengths.cumsum(0) - lengths
    slot = torch.arange(r, device=seq.device).expand(len(seq), r)
    slot = torch.minimum(slot, (resp_len.long() - 1).clamp(min=0)[:, None])  # size = (b, r)
    keep = (starts + prompt_len.long() - 1)[:, None] + slot                   # row start + prompt - 1 + slot
    longest = int(lengths.max())
    col = torch.arange(longest, device=seq.device)
    cell = torch.arange(len(seq) * longest, device=seq.device).view(len(seq), longest)
    grid = RowGrid(gather=(starts[:, None] + torch.minimum(col, lengths[:, None] - 1)).flatten(),
                   scatter=cell[col < lengths[:, None]], rows=len(seq), longest=longest)  # row-major: packed order
    return Packed(seq[real][None], pos[real][None], keep.flatten(), grid)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               packed_rows: RowGrid | None = None, **kwargs):
    """SDPA; on the rows' grid, causal, when their layout comes with the call. size = (1, heads, N,
    head_dim) in, (1, N, heads, head_dim) out, as transformers' attention functions."""
    if packed_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    grid = packed_rows
    window = getattr(module, "sliding_window", None)
    if window is not None and grid.longest > window:
        raise RuntimeError(f"a packed row is longer than the sliding window ({window}): pack only shorter rows")

    def on_grid(x):  # (1, h, N, d) -> (rows, h, longest, d)
        return x[0].index_select(1, grid.gather).unflatten(1, (grid.rows, grid.longest)).transpose(0, 1)

    out = sdpa_attention_forward(module, on_grid(query), on_grid(key), on_grid(value), None, dropout=dropout,
                                 scaling=scaling, is_causal=True, **kwargs)[0]  # size = (rows, longest, h, d)
    return out.flatten(0, 1).index_select(0, grid.scatter)[None], None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def longest_packable(config) -> int | None:
    """Rows up to this long can be packed (plain causal attention over a row is exact only inside
    a sliding window); None: any length."""
    return getattr(config, "sliding_window", None)


def use_packed_attention(model) -> None:
    """Switch a transformers model (or peft model) to the packed attention, unless it runs
    flash-attention 2, which handles packed rows itself."""
    if model.config._attn_implementation != "flash_attention_2":
        with warnings.catch_warnings():  # transformers 5 warns about its own deprecated helper here
            warnings.simplefilter("ignore", FutureWarning)
            model.set_attn_implementation(ATTENTION)
