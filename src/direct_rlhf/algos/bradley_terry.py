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
