"""Bradley-Terry pairwise loss for reward-model training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood that the chosen response beats the rejected one.

    BT models P(chosen > rejected) = sigmoid(r_c - r_r); ``logsigmoid`` keeps it stable for large gaps.
    ``margin`` (Llama-2 style) demands the gap exceed a per-pair margin before the loss flattens.
    BT is invariant to adding a constant to all rewards, so ``center_coef`` adds
    mean((r_c + r_r)^2) to pin the free offset near 0 (Eisenstein et al. 2023; TRL's
    ``center_rewards_coefficient``), which keeps rewards comparable across checkpoints.

    Returns (loss scalar, stats) with detached ``accuracy`` (fraction r_c > r_r, ties count as wrong)
    and ``margin`` (mean r_c - r_r).
    """
    diff = r_chosen - r_rejected  # size = (B,)
    logits = diff if margin is None else diff - margin  # size = (B,)
    loss = -F.logsigmoid(logits).mean()
    if center_coef != 0.0:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    stats = {
        "accuracy": (diff > 0).float().mean().detach(),
        "margin": diff.mean().detach(),
    }
    return loss, stats


def cost_sign_loss(costs: torch.Tensor, unsafe: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Safe-RLHF's classification term for a cost model: mean of -log sigmoid(s * c), with s = +1
    for a response labelled unsafe and -1 for a safe one.

    Bradley-Terry alone fixes only cost *differences*, so the zero of a cost model trained on pairs
    means nothing and neither does a cost threshold. This term puts unsafe responses above 0 and
    safe ones below, so ``ppo.cost_threshold: 0`` reads "mean cost on the safe side of the
    boundary". Safe-RLHF's sequence-wise cost loss is bradley_terry_loss(c_unsafer, c_safer) plus
    this term for each side of the pair (`values/cost/trainer.py`); `train/reward.py` adds it the
    same way.

    ``unsafe``: 1.0 (or True) = unsafe, 0.0 = safe, same shape as ``costs``. Stats (detached):
    ``sign_accuracy`` = fraction with sign(c) == s (a cost of exactly 0 counts as wrong).
    """
    sign = unsafe.to(costs.dtype) * 2.0 - 1.0  # size = costs.shape, +1 unsafe / -1 safe
    loss = -F.logsigmoid(sign * costs).mean()
    return loss, {"sign_accuracy": (sign * costs > 0).float().mean().detach()}
