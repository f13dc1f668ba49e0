"""Score a preference pair's two transcripts in ONE row, computing their shared prefix once.

A chosen and a rejected transcript are identical up to the last assistant turn (and often past
it: the same opening phrase). Run separately, that prefix goes through the model twice. Packed,
a row is ``chosen + rejected[p:]`` (p = the length of their common token prefix) with

- position ids ``0 .. len(chosen)-1`` then ``p .. len(rejected)-1``: the rejected suffix sits
  where it would sit in its own sequence;
- an attention mask in which the chosen part is causal, and each rejected-suffix token sees the
  shared prefix and the suffix before it, never the chosen continuation.

Every token then attends to exactly the tokens it would attend to alone, so the scores are the
unpacked scores (up to float summation order; tests/test_reward.py checks it). On the toy world's
pairs this drops 37% of the tokens of a reward-model training step (benchmarks/reward_packing.py).

Needs a 4-D additive attention mask, which Hugging Face's eager and SDPA attention accept;
`can_pack` says when a model qualifies (others, e.g. FlashAttention or a sliding window shorter than
reward.max_len, use two rows per pair).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.reward_model import length_sorted_chunks, pad_right

EncodedPair = tuple[list[int], list[int]]


def shared_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def packed_len(pair: EncodedPair) -> int:
    chosen, rejected = pair
    return len(chosen) + len(rejected) - shared_prefix_len(chosen, rejected)


def row_lengths(pairs: Sequence[EncodedPair], packed: bool) -> list[int]:
    """The width each pair takes in a batch: its packed row, or the longer of its two rows."""
    return [packed_len(p) if packed else max(map(len, p)) for p in pairs]


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    """The plain sequence-classification model under any peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_pack(model: torch.nn.Module, max_len: int) -> bool:
    """True for a backbone + `score` head whose attention takes a custom 4-D mask, and whose
    sliding window (if any) covers a whole transcript (the custom mask does not apply it)."""
    inner = _classifier(model)
    impl = getattr(inner.config, "_attn_implementation", None)
    window = getattr(inner.config, "sliding_window", None)
    return hasattr(inner, "score") and hasattr(inner, getattr(inner, "base_model_prefix", "")) and \
        impl in ("eager", "sdpa") and (window is None or window >= max_len)


def pack(batch: Sequence[EncodedPair], pad_id: int, dtype: torch.dtype = torch.float32):
    """(input_ids, position_ids, mask, chosen_at, rejected_at) for a batch of B pairs.

    input_ids and position_ids: size = (B, W); mask: size = (B, 1, W, W), 0 where a query (row)
    may attend to a key (column), the dtype's minimum elsewhere; chosen_at / rejected_at: size =
    (B,), the column whose hidden state scores each transcript (its last token).
    """
    rows, pos, c_len, p_len, r_at = [], [], [], [], []
    for chosen, rejected in batch:
        p = shared_prefix_len(chosen, rejected)
        rows.append(list(chosen) + list(rejected[p:]))
        pos.append(list(range(len(chosen))) + list(range(p, len(rejected))))
        c_len.append(len(chosen))
        p_len.append(p)
        # a rejected transcript that is a prefix of the chosen one is read inside the chosen part
        r_at.append(len(rows[-1]) - 1 if len(rejected) > p else len(rejected) - 1)
    ids, real = pad_right(rows, pad_id)  # size = (B, W) each
    position_ids, _ = pad_right(pos, 0)  # size = (B, W)
    width = ids.shape[1]
    lc = torch.tensor(c_len)[:, None, None]  # size = (B, 1, 1)
    lp = torch.tensor(p_len)[:, None, None]
    end = real.sum(1)[:, None, None]  # size = (B, 1, 1): the row's real length
    q = torch.arange(width)[None, :, None]  # size = (1, W, 1): query index
    k = torch.arange(width)[None, None, :]  # size = (1, 1, W): key index
    causal = k <= q
    in_chosen, in_suffix = q < lc, (q >= lc) & (q < end)
    allowed = (in_chosen & causal) | (in_suffix & ((k < lp) | ((k >= lc) & causal))) | ((q >= end) & (k == q))
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, position_ids, mask[:, None], lc.view(-1) - 1, torch.tensor(r_at)


def packed_rewards(model: torch.nn.Module, batch: Sequence[EncodedPair], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each size = (B,), fp32, from one packed forward pass."""
    inner = _classifier(model)
    backbone = getattr(inner, inner.base_model_prefix)
    weight = backbone.get_input_embeddings().weight
    device, dtype = weight.device, weight.dtype
    ids, position_ids, mask, c_at, r_at = pack(batch, pad_id, dtype)
    hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=position_ids.to(device)).last_hidden_state  # size = (B, W, H)
    rows = torch.arange(len(batch), device=device)
    picked = torch.cat([hidden[rows, c_at.to(device)], hidden[rows, r_at.to(device)]])  # size = (2B, H)
    scores = inner.score(picked)[:, 0].float()  # size = (2B,)
    return scores[: len(batch)], scores[len(batch):]


@torch.no_grad()
def packed_scores(model: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad (r_chosen, r_rejected) of many pairs, each size = (N,), on the CPU, in batches
    sorted by packed length."""
    chosen, rejected = torch.empty(len(pairs)), torch.empty(len(pairs))  # size = (N,) each
    for chunk in length_sorted_chunks(row_lengths(pairs, packed=True), batch_size):
        c, r = packed_rewards(model, [pairs[i] for i in chunk], pad_id)
        chosen[chunk], rejected[chunk] = c.cpu(), r.cpu()
    return chosen, rejected
