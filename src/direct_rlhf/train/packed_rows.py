"""Micro-batches without padding: a micro-batch's rows packed end to end into one sequence.

Length-grouped micro-batches (`PPOTrainer._micro_batches`) still pad each row to its group's
longest prompt and longest response: 8-9% of the positions on the toy prompts, 17-22% on prompts
with 0-4 turns of history (docs/performance.md). Packed, the b rows of a micro-batch become one
row of their real tokens only, each row's positions counting from 0 as before, so the linear
layers, norms and LM head see no padding at all. Attention lays the queries, keys and values out
on a (rows, longest row) grid again, right-padded, and runs one causal call of the model's kind
(SDPA, `_attention`, or its own eager function, `_eager_attention`): no token attends across
rows, and a row's real tokens never see its padding, which comes after them. The outputs that
predict each response token are picked out with `keep`, so callers get the same (b, r) tensors
as from a padded micro-batch.

Models switch to the packed attention once (`use_packed_attention`); it runs the ordinary kernel,
with transformers' masks, for every call that brings no row layout (generation, the PPO-ptx loss, a
LoRA critic's reward pass), and gradient checkpointing's recomputation gets the same layout.
Flash-attention-2 models keep their kernel, which finds the rows' bounds from the position ids.
"""

from __future__ import annotations

import sys
import warnings
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

ATTENTION = "direct_rlhf_packed"              # SDPA
ATTENTION_EAGER = "direct_rlhf_packed_eager"  # the model's own eager attention (matrix products and a softmax)


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


def _on_grid(module, grid: RowGrid, attend, query, key, value, **kwargs):
    """`attend` (causal) over the rows laid out on their grid. size = (1, heads, N, head_dim) in,
    (1, N, heads, head_dim) out, as transformers' attention functions."""
    window = getattr(module, "sliding_window", None)
    if window is not None and grid.longest > window:
        raise RuntimeError(f"a packed row is longer than the sliding window ({window}): pack only shorter rows")

    def lay_out(x):  # (1, h, N, d) -> (rows, h, longest, d)
        return x[0].index_select(1, grid.gather).unflatten(1, (grid.rows, grid.longest)).transpose(0, 1)

    out = attend(module, lay_out(query), lay_out(key), lay_out(value), **kwargs)[0]  # size = (rows, longest, h, d)
    return out.flatten(0, 1).index_select(0, grid.scatter)[None], None


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               packed_rows: RowGrid | None = None, **kwargs):
    """SDPA; on the rows' grid, causal, when their layout comes with the call."""
    if packed_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return _on_grid(module, packed_rows, sdpa_attention_forward, query, key, value, attention_mask=None,
                    dropout=dropout, scaling=scaling, is_causal=True, **kwargs)


def _eager_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     packed_rows: RowGrid | None = None, **kwargs):
    """The model's own eager attention (the `eager_attention_forward` of its modeling module; SDPA
    for a model without one); on the rows' grid, under a causal mask, when their layout comes with
    the call."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        return _attention(module, query, key, value, attention_mask, dropout, scaling, packed_rows, **kwargs)
    if packed_rows is None:
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    n = packed_rows.longest
    causal = torch.full((n, n), torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device).triu(1)
    return _on_grid(module, packed_rows, eager, query, key, value, attention_mask=causal[None, None],
                    dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
AttentionInterface.register(ATTENTION_EAGER, _eager_attention)
AttentionMaskInterface.register(ATTENTION_EAGER, eager_mask)


def longest_packable(config) -> int | None:
    """Rows up to this long can be packed (plain causal attention over a row is exact only inside
    a sliding window); None: any length."""
    return getattr(config, "sliding_window", None)


def use_packed_attention(model) -> None:
    """Switch a transformers model (or peft model) to the packed attention: the eager kind if it
    runs eager attention, else SDPA; flash-attention 2 handles packed rows itself."""
    current = model.config._attn_implementation
    if current != "flash_attention_2":
        with warnings.catch_warnings():  # transformers 5 warns about its own deprecated helper here
            warnings.simplefilter("ignore", FutureWarning)
            model.set_attn_implementation(ATTENTION_EAGER if current == "eager" else ATTENTION)
