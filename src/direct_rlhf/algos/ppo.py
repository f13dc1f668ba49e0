"""PPO for language models: masked stats, KL-shaped rewards, GAE, clipped losses, KL/Lagrange controllers.

Conventions (all functions):
- B = batch of sequences, T = response length, V = vocabulary size.
- ``mask`` is 1.0 on response tokens and 0.0 on (right-)padding, same shape as the tensor it masks.
- Losses are *minimised*; advantages are "higher is better".
- Nothing here detaches inputs, except the stats dicts, which are always detached tensors.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

KLEstimator = Literal["k1", "k3"]


# ----------------------------------------------------------------------------- masked statistics


AllSum = Callable[[torch.Tensor], torch.Tensor]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                all_sum: AllSum | None = None) -> torch.Tensor:
    """Mean over entries where mask is 1, so padding never dilutes token-level averages.

    An all-zero mask gives 0 rather than NaN (an empty batch should not poison the loss).
    ``all_sum`` (data parallel, whole-tensor means only) sums over processes, so every process
    gets the statistic of the whole batch, however its rows were split.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        s = all_sum or _local
        return s((x * mask).sum()) / s(mask.sum()).clamp_min(1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               all_sum: AllSum | None = None) -> torch.Tensor:
    """Variance over masked entries (Bessel-corrected if ``unbiased`` and more than one entry)."""
    mean = masked_mean(x, mask, all_sum=all_sum)
    var = masked_mean((x - mean) ** 2, mask, all_sum=all_sum)
    if unbiased:
        n = (all_sum or _local)(mask.to(x.dtype).sum())
        var = var * torch.where(n > 1, n / (n - 1).clamp_min(1e-8), torch.ones_like(n))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    all_sum: AllSum | None = None,
) -> torch.Tensor:
    """Normalise to unit (unbiased) variance using statistics of the masked entries only.

    ``shift_mean=False`` rescales but keeps the mean: used for rewards, where the sign of the
    mean carries information (advantages, in contrast, are fully centred).
    Padding positions are set to 0 so they cannot leak large values into later reductions.
    ``all_sum`` (data parallel): whiten with the whole batch's statistics (see `masked_mean`).
    """
    mean, var = masked_mean(x, mask, all_sum=all_sum), masked_var(x, mask, all_sum=all_sum)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # size = x.shape
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# ----------------------------------------------------------------------------- KL and reward shaping


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples drawn from the policy.

    k1 = log p - log q: unbiased but can be negative per token.
    k3 = (q/p - 1) - log(q/p): unbiased and always >= 0 (Schulman, "Approximating KL divergence"),
    lower variance; ~= k1^2 / 2 when the two are close.
    """
    log_ratio = logprobs - ref_logprobs  # size = (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (exp(ref - logp) - 1) - (ref - logp)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def shape_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-token reward: -kl_coef * KL on every response token, plus the sequence score at the last one.

    The KL term keeps the policy near the reference model (Ziegler et al. 2019); the reward model
    only scores complete sequences, so its score lands on the final token. A row with no valid
    tokens gets nothing. Returns (rewards, kl), both (B, T), zero on padding.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask  # size = (B, T)
    rewards = -kl_coef * kl  # size = (B, T)
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device)  # size = (T,)
    last_idx = (positions * mask).amax(dim=1).long()  # size = (B,), index of last valid token
    has_tokens = (mask.sum(dim=1) > 0).to(rewards.dtype)  # size = (B,)
    bonus = (score.to(rewards.dtype) * has_tokens).unsqueeze(1)  # size = (B, 1)
    rewards = rewards.scatter_add(1, last_idx.unsqueeze(1), bonus)
    return rewards, kl


def shape_costs(
    cost: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """Dense per-token cost for PPO-Lagrangian: +kl_coef * KL on every response token, plus the
    sequence's cost at the last one (B, T), zero on padding.

    The KL enters the cost with the opposite sign to the reward (Safe-RLHF's ppo_lag trainer,
    `add_kl_divergence_regularization`), so in (A_r - lambda A_c) / (1 + lambda) its share is
    (-kl_coef - lambda kl_coef) / (1 + lambda) = -kl_coef for every lambda: the anchor to the base
    model keeps the weight it has in plain PPO however hard the constraint pulls. With the KL on the
    reward side only, it would be kl_coef / (1 + lambda): a quarter at lambda = 3.
    """
    costs, _ = shape_rewards(-cost, logprobs, ref_logprobs, mask, kl_coef, estimator)  # -(cost) - kl_coef KL
    return -costs  # size = (B, T)


# ----------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), vectorised over the batch.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}.
    The sequence ends at its last valid token, so V and A beyond it count as 0 (terminal state).
    Assumes right padding (mask is 1...1 0...0 per row). Padding gets advantage 0.
    Returns (advantages, returns = advantages + values), both (B, T); callers usually run this
    under ``torch.no_grad()``.
    """
    mask = mask.to(values.dtype)
    values = values * mask  # size = (B, T), padding values ignored
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # size = (B, T)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # size = (B,)
    next_value = torch.zeros_like(next_adv)  # size = (B,)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # size = (B,)
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    returns = advantages + values  # size = (B, T)
    return advantages, returns


# ----------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, averaged over response tokens (minimise it).

    Taking the max of the two *negated* objectives is the pessimistic bound that stops the
    ratio moving beyond [1 - eps, 1 + eps] in the direction the advantage pushes it.
    Stats (detached): ``clipfrac`` = fraction of tokens where the clipped term was strictly larger
    (i.e. active, no gradient); ``approx_kl`` = masked mean of 0.5 * (logp - old_logp)^2
    (the k2 estimator of KL(old || new), as in cleanRL/TRL's reported ``approx_kl``).
    """
    log_ratio = logprobs - old_logprobs  # size = (B, T)
    ratio = torch.exp(log_ratio)  # size = (B, T)
    pg_unclipped = -advantages * ratio  # size = (B, T)
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # size = (B, T)
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

    The clip limits how far one PPO epoch can move the value head, mirroring the policy clip.
    Stats (detached): ``vf_clipfrac`` = fraction of tokens where the clipped error was strictly larger.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # size = (B, T)
    err_unclipped = (values - returns) ** 2  # size = (B, T)
    err_clipped = (values_clipped - returns) ** 2  # size = (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), mask)}
    return loss, stats


# ----------------------------------------------------------------------------- logits helpers


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis: H = logsumexp(z) - sum softmax(z) * z.

    Logits are shifted by their max first (H is shift-invariant), so huge logits neither overflow
    nor lose precision to cancellation between two large terms; -inf (banned) logits are clamped
    to the dtype's minimum so 0 * -inf cannot make NaNs in the value or its gradient.
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # size = (B, T, V), max is 0
    shifted = shifted.clamp_min(torch.finfo(logits.dtype).min)
    probs = torch.softmax(shifted, dim=-1)  # size = (B, T, V)
    return torch.logsumexp(shifted, dim=-1) - (probs * shifted).sum(dim=-1)  # size = (B, T)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] = gathered logit - logsumexp; never builds a (B, T, V) log_softmax.

    For bf16/fp16 logits, upcast first if you need fp32-accurate log-probs.
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # size = (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # size = (B, T)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked entries: 1 = perfect critic, 0 = no better than a constant.

    NaN/inf if the returns have zero variance (undefined, as in cleanRL).
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    return 1.0 - var_residual / var_returns


# ----------------------------------------------------------------------------- controllers


class FixedKLController:
    """Constant KL coefficient, with the same interface as the adaptive one."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards ``target`` (Ziegler et al. 2019).

    error = clip(KL / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    The clip bounds the change per update so one noisy KL estimate cannot blow the coefficient up.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class LagrangeMultiplier:
    """Lambda for PPO-Lagrangian (Safe-RLHF): maximise reward subject to E[cost] <= threshold.

    Lambda is stored directly and clamped to [0, max_value] after each step (projected gradient
    ascent on lambda * (Jc - threshold)), rather than as log-lambda, because:
    it can become exactly 0 when the constraint is slack (log-lambda only decays towards 0 and then
    needs many steps to grow back, since its step scales with lambda), and the additive step
    ``lr * (Jc - threshold)`` is easy to reason about and tune.

    Safe-RLHF instead keeps log-lambda and takes one SGD step on -(Jc - threshold) * exp(log_lambda):
    log_lambda += lr * lambda * (Jc - threshold), i.e. lambda *= exp(lr * lambda * (Jc - threshold)),
    a step of about lr * lambda^2 * (Jc - threshold): the same as this one at lambda = 1 (both
    start there by default), smaller below 1, larger above (docs/ppo-lagrangian.md).
    """

    def __init__(self, init_value: float, lr: float, max_value: float | None = None) -> None:
        if init_value < 0:
            raise ValueError(f"init_value must be >= 0, got {init_value}")
        self.lr = float(lr)
        self.max_value = None if max_value is None else float(max_value)
        self.value = self._project(float(init_value))

    def _project(self, value: float) -> float:
        value = max(value, 0.0)
        return value if self.max_value is None else min(value, self.max_value)

    def update(self, mean_episode_cost: float, cost_threshold: float) -> float:
        """Raise lambda while the constraint is violated (Jc > threshold), lower it otherwise."""
        self.value = self._project(self.value + self.lr * (float(mean_episode_cost) - float(cost_threshold)))
        return self.value

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "lr": self.lr, "max_value": self.max_value}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.lr = float(state.get("lr", self.lr))  # type: ignore[arg-type]
        if "max_value" in state:
            max_value = state["max_value"]
            self.max_value = None if max_value is None else float(max_value)
        self.value = self._project(float(state["value"]))  # type: ignore[arg-type]


def lagrangian_advantages(
    reward_adv: torch.Tensor, cost_adv: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """Combined advantage (A_r - lambda * A_c) / (1 + lambda) (Safe-RLHF's `actor_loss_fn`).

    Dividing by 1 + lambda keeps the advantage scale bounded as lambda grows, so the PPO clip range
    and learning rate stay meaningful (Safe-RLHF, Dai et al. 2023). Give it the *raw* GAE advantages
    (whiten the result, if at all): whitened separately, A_r and A_c would each be divided by their
    own batch's spread, and lambda would weigh cost against reward at a ratio that drifts every step.
    The KL term belongs on both sides (`shape_rewards` and `shape_costs`) so that it keeps its weight.
    """
    return (reward_adv - lam * cost_adv) / (1.0 + lam)  # size = (B, T)
