"""Unit tests for direct_rlhf.algos against hand-computed values (arithmetic in comments)."""

import math

import pytest
import torch

from direct_rlhf.algos.bradley_terry import bradley_terry_loss
from direct_rlhf.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    LagrangeMultiplier,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    lagrangian_advantages,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)


def t(*rows):
    """float64 tensor: t(1.0) -> 0-d, t([..]) or t(a, b) -> 1-d, t([..], [..]) -> 2-d."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float64)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_padding_and_reduces_along_dim():
    x = t([1.0, 2.0], [3.0, 4.0])
    mask = t([1.0, 0.0], [1.0, 1.0])
    close(masked_mean(x, mask), 8.0 / 3.0)  # (1 + 3 + 4) / 3
    close(masked_mean(x, mask, dim=1), [1.0, 3.5])  # row0: 1/1, row1: (3+4)/2
    close(masked_mean(x, mask.bool()), 8.0 / 3.0)  # boolean masks work too


def test_masked_mean_empty_mask_is_zero_not_nan():
    close(masked_mean(t([5.0, 6.0]), t([0.0, 0.0])), 0.0)


def test_masked_var_unbiased_and_biased():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])
    # masked values 1,2,3: mean 2, squared deviations 1,0,1 -> sum 2
    close(masked_var(x, mask, unbiased=True), 1.0)  # 2 / (3 - 1)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)  # 2 / 3


def test_masked_whiten_uses_masked_entries_only():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])
    # mean 2, unbiased std 1 -> (x - 2) / 1 on valid tokens; padding zeroed
    out = masked_whiten(x, mask)
    close(out, [-1.0, 0.0, 1.0, 0.0])
    close(masked_mean(out, mask), 0.0)
    close(masked_var(out, mask), 1.0, atol=1e-6)


def test_masked_whiten_shift_mean_false_keeps_mean():
    x, mask = t([2.0, 4.0, 6.0, -50.0], [8.0, 0.0, 0.0, 0.0]), t([1, 1, 1, 0], [1, 0, 0, 0])
    # valid values 2,4,6,8: mean 5, squared deviations 9,1,1,9 = 20, unbiased var 20/3
    std = math.sqrt(20.0 / 3.0)
    out = masked_whiten(x, mask, shift_mean=False)
    expected = t([(2 - 5) / std + 5, (4 - 5) / std + 5, (6 - 5) / std + 5, 0.0],
                 [(8 - 5) / std + 5, 0.0, 0.0, 0.0])
    close(out, expected)
    close(masked_mean(out, mask), 5.0)  # mean preserved
    close(masked_var(out, mask), 1.0)  # but variance normalised


# ----------------------------------------------------------------------------- KL and reward shaping


def test_kl_k1_and_k3_explicit_values():
    logp, ref = t(math.log(0.5), math.log(0.25)), t(math.log(0.25), math.log(0.5))
    # token0: p=0.5, q=0.25 -> k1 = log 2 = 0.693147; k3 = (q/p - 1) - log(q/p) = -0.5 + log 2 = 0.193147
    # token1: p=0.25, q=0.5 -> k1 = -log 2 = -0.693147; k3 = (2 - 1) - log 2 = 0.306853
    close(kl_penalty(logp, ref, "k1"), [0.693147, -0.693147])
    k3 = kl_penalty(logp, ref, "k3")
    close(k3, [0.193147, 0.306853])
    assert (k3 >= 0).all()


def test_k3_nonnegative_and_approx_half_k1_squared_for_small_differences():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    # d = 0.01: k3 = e^-d - 1 + d = d^2/2 - d^3/6 + ... ~= 5e-5
    d = t(0.01, -0.01)
    k1, k3 = kl_penalty(d, torch.zeros_like(d), "k1"), kl_penalty(d, torch.zeros_like(d), "k3")
    torch.testing.assert_close(k3, k1**2 / 2, rtol=5e-3, atol=0)
    with pytest.raises(ValueError):
        kl_penalty(d, d, "k2")  # type: ignore[arg-type]


def test_shape_rewards_adds_score_at_last_valid_token_and_handles_empty_rows():
    logp = t([0.1, 0.2, 0.3], [0.5, 0.5, 9.0], [1.0, 1.0, 1.0])
    ref = torch.zeros_like(logp)
    mask = t([1, 1, 1], [1, 1, 0], [0, 0, 0])
    score = t(1.0, 2.0, 5.0)
    rewards, kl = shape_rewards(score, logp, ref, mask, kl_coef=0.5, estimator="k1")
    # row0: -0.5 * [0.1, 0.2, 0.3] = [-0.05, -0.1, -0.15], +1 at t=2 -> 0.85
    # row1: -0.5 * [0.5, 0.5, (pad)] = [-0.25, -0.25, 0], +2 at t=1 -> 1.75
    # row2: no valid tokens -> all zeros, score dropped
    close(rewards, [[-0.05, -0.1, 0.85], [-0.25, 1.75, 0.0], [0.0, 0.0, 0.0]])
    close(kl, [[0.1, 0.2, 0.3], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])


def test_shape_costs_adds_kl_with_the_opposite_sign_and_the_cost_at_the_last_token():
    from direct_rlhf.algos.ppo import shape_costs

    logp = t([0.1, 0.2, 0.3], [0.5, 0.5, 9.0], [1.0, 1.0, 1.0])
    ref = torch.zeros_like(logp)
    mask = t([1, 1, 1], [1, 1, 0], [0, 0, 0])
    costs = shape_costs(t(1.0, -2.0, 5.0), logp, ref, mask, kl_coef=0.5, estimator="k1")
    # row0: +0.5 * [0.1, 0.2, 0.3] = [0.05, 0.1, 0.15], +1 at t=2 -> 1.15
    # row1: +0.5 * [0.5, 0.5, (pad)] = [0.25, 0.25, 0], -2 at t=1 -> -1.75
    # row2: no valid tokens -> all zeros, cost dropped
    close(costs, [[0.05, 0.1, 1.15], [0.25, -1.75, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_kl_keeps_its_weight_in_the_lagrangian_advantage_whatever_lambda(lam):
    """Safe-RLHF's ppo_lag: -kl_coef KL on the reward side, +kl_coef KL on the cost side, so in
    (A_r - lambda A_c) / (1 + lambda) the KL weighs kl_coef for every lambda (with the KL on the
    reward side only it would weigh kl_coef / (1 + lambda): a quarter at lambda = 3)."""
    from direct_rlhf.algos.ppo import shape_costs

    logp, ref, mask = t([[0.1, 0.2, 0.3]]), t([[0.0, 0.0, 0.0]]), t([[1.0, 1.0, 1.0]])
    zero = t([0.0])  # no score, no cost: only the KL is left
    rewards, _ = shape_rewards(zero, logp, ref, mask, kl_coef=0.5)
    costs = shape_costs(zero, logp, ref, mask, kl_coef=0.5)
    values = torch.zeros_like(logp)
    a_r, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # reward-to-go: -0.5 * [0.6, 0.5, 0.3]
    a_c, _ = gae(costs, values, mask, gamma=1.0, lam=1.0)  # cost-to-go: +0.5 * [0.6, 0.5, 0.3]
    # (-0.5 rtg - lam * 0.5 rtg) / (1 + lam) = -0.5 rtg = [-0.3, -0.25, -0.15]
    close(lagrangian_advantages(a_r, a_c, lam), [[-0.3, -0.25, -0.15]])


# ----------------------------------------------------------------------------- GAE


def test_gae_three_tokens_by_hand():
    rewards, values, mask = t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]]), t([[1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # gamma*lam = 0.72; V after the last token = 0
    # t=2: delta = 2 + 0.9*0   - 1.5 = 0.5 ; A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35; A1 = 0.35 + 0.72*0.5  = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4 ; A0 = 1.4  + 0.72*0.71 = 1.9112
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[1.9112 + 0.5, 0.71 + 1.0, 0.5 + 1.5]])  # returns = A + V


def test_gae_padded_row_treats_last_valid_token_as_terminal():
    rewards = t([1.0, 0.0, 2.0], [1.0, 2.0, 99.0], [3.0, 3.0, 3.0])
    values = t([0.5, 1.0, 1.5], [0.5, 1.0, 7.0], [4.0, 4.0, 4.0])
    mask = t([1, 1, 1], [1, 1, 0], [0, 0, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row1: padding value 7.0 must not bootstrap
    # t=1: delta = 2 + 0.9*0 - 1.0 = 1.0; A1 = 1.0
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4; A0 = 1.4 + 0.72*1.0 = 2.12
    close(adv, [[1.9112, 0.71, 0.5], [2.12, 1.0, 0.0], [0.0, 0.0, 0.0]])
    close(ret[1, :2], [2.12 + 0.5, 1.0 + 1.0])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = t([[1.0, 2.0, 3.0, 0.0]]), t([[0.5, -1.0, 2.0, 0.0]]), t([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go: [6, 5, 3]; A = G - V = [5.5, 6, 1]; returns = G
    close(adv, [[5.5, 6.0, 1.0, 0.0]])
    close(ret[:, :3], [[6.0, 5.0, 3.0]])


# ----------------------------------------------------------------------------- losses


def _policy_case():
    # token:        a     b     c     d     pad
    ratio = t([1.5, 1.1, 0.5, 1.5, 3.0])
    adv = t([1.0, 2.0, -1.0, -1.0, 100.0])
    mask = t([1, 1, 1, 1, 0])
    old = torch.zeros_like(ratio)
    return ratio.log().requires_grad_(), old, adv, mask


def test_policy_loss_clipping_active_and_inactive():
    logp, old, adv, mask = _policy_case()
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # a: A=+1, r=1.5: max(-1.5, -1.2) = -1.2   (clipped active)
    # b: A=+2, r=1.1: max(-2.2, -2.2) = -2.2   (inside range, not active)
    # c: A=-1, r=0.5: max( 0.5,  0.8) =  0.8   (clipped active)
    # d: A=-1, r=1.5: max( 1.5,  1.2) =  1.5   (not active: pessimistic side is unclipped)
    # loss = (-1.2 - 2.2 + 0.8 + 1.5) / 4 = -0.275
    close(loss, -0.275)
    close(stats["clipfrac"], 0.5)  # 2 of 4
    # approx_kl = 0.5 * mean(log(r)^2) = 0.5 * (0.164402 + 0.009084 + 0.480453 + 0.164402) / 4 = 0.102293
    close(stats["approx_kl"], 0.102293)
    assert not stats["clipfrac"].requires_grad
    # gradients: clipped tokens get 0; d loss/d logp = -A * r / 4 otherwise
    loss.backward()
    close(logp.grad, [0.0, -2.0 * 1.1 / 4, 0.0, 1.0 * 1.5 / 4, 0.0])


def test_policy_loss_equals_minus_mean_advantage_when_on_policy():
    logp = t([0.3, -1.0, 2.0])
    adv, mask = t([1.0, -3.0, 4.0]), t([1.0, 1.0, 1.0])
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, clip_eps=0.2)
    close(loss, -(1.0 - 3.0 + 4.0) / 3)  # r = 1 -> loss = -mean(A)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)


def test_value_loss_clipping():
    old = t([1.0, 1.0, 1.0, 1.0])
    values = t([2.0, 1.1, 0.0, 100.0])
    returns = t([2.0, 2.0, 2.0, 0.0])
    mask = t([1, 1, 1, 0])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    # a: v=2.0 -> clip 1.2: max((2-2)^2, (1.2-2)^2) = max(0, 0.64) = 0.64   (clipped active)
    # b: v=1.1 -> clip 1.1: max(0.81, 0.81) = 0.81                           (not active)
    # c: v=0.0 -> clip 0.8: max(4, 1.44) = 4                                 (not active)
    # loss = 0.5 * (0.64 + 0.81 + 4) / 3 = 0.908333
    close(loss, 0.5 * 5.45 / 3)
    close(stats["vf_clipfrac"], 1.0 / 3.0)


# ----------------------------------------------------------------------------- logits helpers


def test_entropy_uniform_known_and_large_logits():
    close(entropy_from_logits(torch.zeros(2, 3, 7, dtype=torch.float64)), torch.full((2, 3), math.log(7)))
    # p = [0.5, 0.25, 0.25]: H = 0.5*ln2 + 2*0.25*ln4 = 1.5*ln2 = 1.039721
    logits = torch.log(t([[[0.5, 0.25, 0.25]]]))  # size = (1, 1, 3)
    close(entropy_from_logits(logits), [[1.5 * math.log(2)]])
    # huge logits must not overflow: two equal maxima -> ln 2
    big = torch.tensor([[[1e4, 1e4, -1e4]]], dtype=torch.float32)
    out = entropy_from_logits(big)
    assert torch.isfinite(out).all()
    close(out.double(), [[math.log(2)]], atol=1e-5)
    # banned tokens (-inf logits) contribute nothing, and no NaN in value or gradient
    banned = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(banned)
    h.sum().backward()
    close(h.detach().double(), [[math.log(2)]])
    assert torch.isfinite(banned.grad).all()


def test_logprobs_from_logits_matches_log_softmax_gather():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 4
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, labels), expected, atol=1e-10)
    # explicit: logits [0, ln 3] -> softmax [0.25, 0.75]
    close(logprobs_from_logits(t([[0.0, math.log(3)]]).unsqueeze(0), torch.tensor([[1]])), [[math.log(0.75)]])


def test_explained_variance():
    returns, mask = t([1.0, 2.0, 3.0, 50.0]), t([1, 1, 1, 0])
    close(explained_variance(returns.clone(), returns, mask), 1.0)  # perfect critic
    close(explained_variance(t([7.0, 7.0, 7.0, 0.0]), returns, mask), 0.0)  # constant critic
    # V = [1, 2, 4]: residual [0, 0, -1], biased var = 2/9 ; Var[R] = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    close(explained_variance(t([1.0, 2.0, 4.0, -9.0]), returns, mask), 2.0 / 3.0)


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bt_loss_single_pair_with_margin_and_centering():
    rc, rr = t(1.0), t(0.0)
    loss, _ = bradley_terry_loss(rc, rr)
    close(loss, 0.313262)  # -log sigmoid(1) = log(1 + e^-1)
    loss, _ = bradley_terry_loss(rc, rr, margin=t(0.5))
    close(loss, 0.474077)  # -log sigmoid(1 - 0.5) = log(1 + e^-0.5)
    loss, _ = bradley_terry_loss(rc, rr, center_coef=0.1)
    close(loss, 0.313262 + 0.1 * 1.0)  # + 0.1 * (1 + 0)^2


def test_bt_loss_batch_stats_and_centering():
    rc, rr = t(3.0, 0.0, 1.0), t(1.0, 1.0, 1.0)
    loss, stats = bradley_terry_loss(rc, rr, center_coef=0.01)
    # diffs [2, -1, 0]: -logsig = [log(1+e^-2), log(1+e), log 2] = [0.126928, 1.313262, 0.693147]
    # mean = 2.133337 / 3 = 0.711112 ; centering: sums [4, 1, 2] -> squares [16, 1, 4] mean 7 -> +0.07
    close(loss, 0.711112 + 0.07)
    close(stats["accuracy"], 1.0 / 3.0)  # only the first pair; a tie is not a win
    close(stats["margin"], 1.0 / 3.0)  # mean(2, -1, 0)


def test_bt_loss_gradient_pushes_chosen_up():
    rc, rr = t(0.0, 0.0).requires_grad_(), t(0.0, 0.0).requires_grad_()
    loss, _ = bradley_terry_loss(rc, rr)
    loss.backward()
    # d/d r_c of -logsig(r_c - r_r) = -(1 - sigmoid(0)) = -0.5, / 2 for the mean
    close(rc.grad, [-0.25, -0.25])
    close(rr.grad, [0.25, 0.25])


def test_cost_sign_loss_by_hand():
    """Safe-RLHF's classification term: -log sigmoid(s c), s = +1 unsafe / -1 safe."""
    from direct_rlhf.algos.bradley_terry import cost_sign_loss

    loss, stats = cost_sign_loss(t(1.0, -1.0), t(1.0, 0.0))
    close(loss, 0.313262)  # both on the right side by 1: log(1 + e^-1) each
    close(stats["sign_accuracy"], 1.0)
    loss, stats = cost_sign_loss(t(2.0, 0.5, 0.0), t(0.0, 1.0, 1.0))
    # s c = [-2, 0.5, 0]: [log(1 + e^2), log(1 + e^-0.5), log 2] = [2.126928, 0.474077, 0.693147], mean 1.098051
    close(loss, 1.098051)
    close(stats["sign_accuracy"], 1.0 / 3.0)  # a cost of exactly 0 has no sign: wrong
    c = t(0.0, 0.0).requires_grad_()
    cost_sign_loss(c, t(1.0, 0.0))[0].backward()
    close(c.grad, [-0.25, 0.25])  # d/dc -logsig(s c) = -s (1 - sigmoid(0)) = -s / 2, / 2 for the mean


# ----------------------------------------------------------------------------- controllers


def test_adaptive_kl_controller_rises_and_falls_exactly():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9 > 6: error = 9/6 - 1 = 0.5 -> clipped 0.2; mult = 1 + 0.2*256/10000 = 1.00512
    assert ctl.update(9.0, n_steps=256) == pytest.approx(0.2 * 1.00512, abs=1e-12)
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    # KL 3 < 6: error = -0.5 -> -0.2; mult = 0.99488
    ctl.update(3.0, 256)
    assert ctl.value == pytest.approx(0.2 * 0.99488, abs=1e-12)
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    # KL 6.6: error 0.1 (within clip); mult = 1 + 0.1*256/10000 = 1.00256
    ctl.update(6.6, 256)
    assert ctl.value == pytest.approx(0.2 * 1.00256, abs=1e-12)


def test_kl_controllers_state_dict_roundtrip():
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(9.0, 256)
    state = ctl.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    fresh = AdaptiveKLController(1.0, 6.0, 10000)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_lagrange_multiplier_ascent_clamp_and_state():
    lag = LagrangeMultiplier(init_value=0.5, lr=0.1)
    assert lag.update(mean_episode_cost=3.0, cost_threshold=1.0) == pytest.approx(0.7)  # 0.5 + 0.1*(3-1)
    assert lag.update(0.0, 10.0) == 0.0  # 0.7 + 0.1*(0-10) = -0.3 -> clamped at 0
    assert lag.update(0.5, 1.0) == 0.0  # still slack: stays at 0
    assert lag.update(2.0, 1.0) == pytest.approx(0.1)  # recovers linearly from exactly 0
    capped = LagrangeMultiplier(0.9, lr=1.0, max_value=1.0)
    assert capped.update(5.0, 0.0) == 1.0  # 0.9 + 5 -> capped
    restored = LagrangeMultiplier(0.0, lr=0.1)
    restored.load_state_dict(lag.state_dict())
    assert restored.value == pytest.approx(0.1)
    with pytest.raises(ValueError):
        LagrangeMultiplier(-0.1, lr=0.1)


def test_lagrangian_advantages():
    ar, ac = t([2.0, -1.0]), t([1.0, 3.0])
    close(lagrangian_advantages(ar, ac, 0.0), ar)  # lambda 0 -> plain reward advantage
    # lambda 1: ([2 - 1, -1 - 3]) / 2 = [0.5, -2]
    close(lagrangian_advantages(ar, ac, 1.0), [0.5, -2.0])
    # lambda 3 as a tensor: ([2 - 3, -1 - 9]) / 4 = [-0.25, -2.5]
    close(lagrangian_advantages(ar, ac, torch.tensor(3.0, dtype=torch.float64)), [-0.25, -2.5])


def _whiten_on_two_processes(rank: int, port: int, x, mask, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def all_sum(v):
        v = v.clone()
        dist.all_reduce(v)
        return v

    rows = slice(0, 1) if rank == 0 else slice(1, 3)  # uneven split, unequal token counts
    torch.save(masked_whiten(x[rows], mask[rows], all_sum=all_sum), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_masked_whiten_over_processes_equals_whitening_the_whole_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    x = t([1.0, 2.0, 0.0], [3.0, 4.0, 5.0], [10.0, 0.0, 0.0])
    mask = t([1, 1, 0], [1, 1, 1], [1, 0, 0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_whiten_on_two_processes, args=(port, x, mask, str(tmp_path)), nprocs=2)
    parts = torch.cat([torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")])
    close(parts, masked_whiten(x, mask), atol=1e-6)
    # each process's own statistics would give something else
    assert not torch.allclose(masked_whiten(x[:1], mask[:1]), parts[:1], atol=1e-3)
