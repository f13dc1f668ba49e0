"""PPO end to end on tiny models: reward rises, stops at end of turn, exact resume, 2 processes."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import MICRO, torchrun
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from direct_rlhf.cli import main
from direct_rlhf.errors import UserError
from direct_rlhf.io import read_jsonl
from direct_rlhf.config import load_config
from direct_rlhf.models.reward_model import RewardScorer
from direct_rlhf.rollout.hf_generate import cut_response, sample
from direct_rlhf.data.prompt_files import prompt_texts
from direct_rlhf.train.ppo import MicroBatch, PPOTrainer
from direct_rlhf.train.ppo_models import reference_mode

PPO_MICRO = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "ppo.max_new_tokens=12",
             "ppo.save_every=2", "ppo.sample_every=2", "ppo.actor_lr=3e-3", "ppo.critic_lr=3e-3", "ppo.ptx_coef=0",
             "ppo.lora.enabled=false"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A micro base model, a reward folder with a random head on it, and the world's PPO prompts."""
    run = tmp_path_factory.mktemp("run")
    assert main(["-q", "pretrain", "--out", str(run), *MICRO]) == 0
    base = run / "base"
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    tok = AutoTokenizer.from_pretrained(base)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(run / "rm")
    tok.save_pretrained(run / "rm")
    (run / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "max_len": 256}))
    return run


def _trainer(run: Path, out: Path, extra=(), reward_fn=None, reward_path: Path | None = None) -> PPOTrainer:
    cfg = load_config(None, [*MICRO, *PPO_MICRO, *extra])
    prompts = prompt_texts(run / "world" / "ppo_prompts.jsonl")
    return PPOTrainer(cfg, str(run / "base"), str(reward_path or run / "rm"), prompts, out, key="test",
                      progress=False, reward_fn=reward_fn)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_stop_at_end_of_turn_keeps_the_sampled_marker_and_cuts_the_text(micro_run):
    """The toy tokenizer's layout; tests/test_token_layouts.py has the real families'."""
    tok = AutoTokenizer.from_pretrained(micro_run / "base")
    answer = tok(" Paris.", add_special_tokens=False)["input_ids"]
    marker = tok("\n\nHuman:", add_special_tokens=False)["input_ids"]
    ids, text, ended = cut_response(tok, answer + marker + [tok.pad_token_id] * 3)
    assert (ids, text, ended) == (answer + marker, " Paris.", True)
    ids, text, ended = cut_response(tok, answer + [tok.eos_token_id, tok.pad_token_id])
    assert (ids, text, ended) == (answer + [tok.eos_token_id], " Paris.", True)
    ids, text, ended = cut_response(tok, answer)
    assert (ids, text, ended) == (answer, " Paris.", False)


def test_generation_logprobs_equal_a_forward_pass_and_micro_batches_equal_one_pass(micro_run, tmp_path):
    """The two speed-ups change nothing: the log-probs taken from generation's logits equal a
    full forward pass over (prompt, response), and an update over length-grouped micro-batches
    equals the same update over the whole mini-batch in one pass."""
    trainer = _trainer(micro_run, tmp_path / "a", ["ppo.micro_batch_size=3", "ppo.temperature=0.7"])
    prompts = trainer.next_prompts()
    samples = sample(trainer.actor, trainer.tokenizer, prompts, 12, 0.7, batch_size=8, logprobs=True)
    seq, attn, pos, mask = trainer._assemble(prompts, samples.response_ids)
    assert len(set(attn[:, :-mask.shape[1]].sum(1).tolist())) > 1  # prompts of different lengths
    with torch.no_grad():
        full = trainer._logprobs(trainer.actor, MicroBatch(torch.arange(len(prompts)), mask.shape[1], seq, attn, pos))
    for i, lp in enumerate(samples.logprobs):  # samples are returned on the CPU
        torch.testing.assert_close(lp, full[i, :len(lp)].cpu(), atol=1e-4, rtol=1e-4)

    exp, _ = trainer.make_experience(prompts, samples, torch.randn(len(prompts)), None)
    one = _trainer(micro_run, tmp_path / "b", ["ppo.micro_batch_size=8", "ppo.temperature=0.7"])
    # micro-batches cut by a budget of token positions (the longest row's): groups of different sizes
    budget = _trainer(micro_run, tmp_path / "c", ["ppo.micro_batch_size=8", "ppo.temperature=0.7",
                                                   f"ppo.micro_batch_tokens={int(attn.sum(1).max())}"])
    sizes, cut = [], budget._micro_batches
    budget._micro_batches = lambda *a: (sizes.append(len(mb.rows)) or mb for mb in cut(*a))
    for t in (trainer, one, budget):
        torch.manual_seed(0)
        t.rl_step(exp)
    assert 1 in sizes and max(sizes) > 1  # the longest rows alone, the shortest together
    assert budget.reward.max_tokens == int(attn.sum(1).max())  # scoring follows the same budget
    for other in (one, budget):
        for (name, a), b in zip(trainer.actor.named_parameters(), other.actor.parameters()):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
        for a, b in zip(trainer.critic.parameters(), other.critic.parameters()):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_micro_batches_hold_at_most_their_rows_and_token_positions():
    from direct_rlhf.train.micro_batching import length_groups

    p, r = [30, 20, 10, 5, 5], [10, 10, 10, 5, 0]  # sorted by length: 40, 30, 20, 10, 5 tokens

    def cut(**kw):
        return [(g.start, g.stop) for g in length_groups(p, r, **kw)]

    assert cut(max_rows=2) == [(0, 2), (2, 4), (4, 5)]
    # packed: a group's real tokens; a row over the budget goes alone
    assert cut(max_rows=8, max_tokens=60, pack_rows=True) == [(0, 1), (1, 4), (4, 5)]
    assert cut(max_rows=8, max_tokens=35, pack_rows=True) == [(0, 1), (1, 2), (2, 5)]
    # padded: rows x (longest prompt + longest response, at least one token)
    assert cut(max_rows=8, max_tokens=60) == [(0, 1), (1, 3), (3, 5)]
    # a group wider than the sliding window is not packed, so it counts as padded
    assert cut(max_rows=8, max_tokens=60, pack_rows=True, pack_limit=25) == [(0, 1), (1, 3), (3, 5)]


@pytest.mark.parametrize("lagrangian", ["false", "true"])
def test_values_from_the_first_epochs_critic_pass_give_the_same_update(micro_run, tmp_path, lagrangian):
    """With one mini-batch per epoch the critics' old values come from the first epoch's own
    forward pass, not from a pass in make_experience: the same values, advantages, statistics and
    updated weights as computing them first (what several mini-batches per epoch still do)."""
    cfg = load_config(None, [*MICRO, *PPO_MICRO, "ppo.mini_batch_size=8", "ppo.micro_batch_size=3",
                             f"ppo.lagrangian={lagrangian}", "ppo.lambda_init=0.5"])
    fused, separate = (PPOTrainer(cfg, str(micro_run / "base"), str(micro_run / "rm"),
                                  prompt_texts(micro_run / "world" / "ppo_prompts.jsonl"), tmp_path / name,
                                  cost_path=str(micro_run / "rm"), progress=False) for name in ("a", "b"))
    assert fused.values_in_first_epoch
    separate.values_in_first_epoch = False
    prompts = fused.next_prompts()
    samples = fused._rollout(prompts)
    score, cost = torch.randn(len(prompts)), torch.randn(len(prompts)) if lagrangian == "true" else None
    exp_a, stats_a = fused.make_experience(prompts, samples, score, cost)
    exp_b, stats_b = separate.make_experience(prompts, samples, score, cost)
    assert exp_a.values is None and exp_b.values is not None and "values/mean" in stats_b
    for t, exp, stats in ((fused, exp_a, stats_a), (separate, exp_b, stats_b)):
        torch.manual_seed(0)
        stats.update(t.rl_step(exp))
    assert exp_a.values is None  # the caller's experience is left as it was
    assert stats_a.keys() == stats_b.keys() and stats_a["values/clipfrac"] > 0
    for name in stats_a:
        assert stats_a[name] == pytest.approx(stats_b[name], rel=1e-4, abs=1e-6), name
    for model in ("actor", "critic", *(["cost_critic"] if lagrangian == "true" else [])):
        for (name, a), b in zip(getattr(fused, model).named_parameters(), getattr(separate, model).parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"{model}.{name}")


def test_bf16_autocast_runs_every_model_in_bfloat16_and_keeps_float32_weights(micro_run, tmp_path):
    """ppo.bf16: generation, scoring, experience and the PPO epochs all multiply in bfloat16
    (actor with its LoRA adapters, critic, reward model); weights and optimiser stay float32, and
    generation's log-probs still match a forward pass (to bfloat16 precision)."""
    trainer = _trainer(micro_run, tmp_path, ["ppo.bf16=true", "ppo.lora.enabled=true"])
    assert trainer.rollout_copy is not None  # a LoRA actor samples through its merged copy
    seen: dict[str, set] = {"actor": set(), "critic": set(), "reward": set(), "rollout": set()}
    for name, model in (("actor", trainer.actor), ("critic", trainer.critic), ("reward", trainer.reward.model),
                        ("rollout", trainer.rollout_copy.model)):
        lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        lin.register_forward_hook(lambda m, i, o, name=name: seen[name].add(o.dtype))
    prompts = trainer.next_prompts()
    with trainer._autocast(), torch.no_grad():
        samples = sample(trainer.actor, trainer.tokenizer, prompts, 12, 1.0, batch_size=8, logprobs=True)
        seq, attn, pos, mask = trainer._assemble(prompts, samples.response_ids)
        full = trainer._logprobs(trainer.actor, MicroBatch(torch.arange(len(prompts)), mask.shape[1], seq, attn, pos))
    for i, lp in enumerate(samples.logprobs):
        torch.testing.assert_close(lp, full[i, :len(lp)].cpu(), atol=0.05, rtol=0.02)
    seen["actor"].clear()
    stats = trainer.step()
    assert seen == {"actor": {torch.bfloat16}, "critic": {torch.bfloat16}, "reward": {torch.bfloat16},
                    "rollout": {torch.bfloat16}}  # the step's generation ran through the copy, autocast
    trainable = [p for m in (trainer.actor, trainer.critic) for p in m.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.grad is not None for p in trainable)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


@pytest.mark.parametrize("lora", ["false", "true"])
def test_model_dtype_loads_frozen_weights_in_it_and_trains_in_float32(micro_run, tmp_path, lora):
    """model.dtype=bfloat16: the frozen weights (reference, reward model, a LoRA base) load in it;
    every trained parameter (a fully trained actor or critic, LoRA adapters, the value head) and so
    its optimiser state is float32, where small updates do not round away."""
    trainer = _trainer(micro_run, tmp_path, ["model.dtype=bfloat16", f"ppo.lora.enabled={lora}",
                                             f"ppo.critic_lora.enabled={lora}"])
    for model in (trainer.actor, trainer.critic):
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    for model in (trainer.actor, trainer.critic.backbone):
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == \
            ({torch.bfloat16} if lora == "true" else set())
    assert trainer.critic.head.weight.dtype == torch.float32
    frozen = [trainer.ref] if lora == "false" else []
    frozen += [trainer.reward.model] if lora == "false" else []  # with a LoRA critic the reward model is inside it
    assert all({p.dtype for p in m.parameters()} == {torch.bfloat16} for m in frozen)
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.step().values())


def test_lora_merges_keep_updates_smaller_than_a_bfloat16_step(micro_run, tmp_path):
    """A LoRA delta of std 1e-5 on bf16 weights: the saved policy and the merged rollout copy hold
    base + delta to float32 precision (merged in bf16, 90% of the delta was lost)."""
    trainer = _trainer(micro_run, tmp_path, ["model.dtype=bfloat16", "ppo.lora.enabled=true"])
    actor = trainer.actor
    torch.manual_seed(0)
    for name, p in actor.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1e-4)
    layer = next(m for n, m in actor.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    delta = layer.get_delta_weight("default").detach().double()
    want = layer.base_layer.weight.detach().double() + delta
    name = next(n for n, m in actor.get_base_model().named_modules() if m is layer) + ".weight"
    copy = dict(trainer.rollout_copy.sync(actor).named_parameters())[name].detach().double()
    merged = dict(trainer.save_policy(tmp_path / "policy", {}) and
                  AutoModelForCausalLM.from_pretrained(tmp_path / "policy").named_parameters())[name].detach().double()
    for got in (copy, merged):  # (save_policy merged the actor in place: nothing of it is read after)
        assert (got - want).norm() / delta.norm() < 1e-3


def test_attn_implementation_reaches_every_role(micro_run, tmp_path):
    for lora in ("true", "false"):
        for pack in ("true", "false"):  # packed rows: the models that read them attend on the rows' grid
            trainer = _trainer(micro_run, tmp_path / f"{lora}{pack}",
                               ["ppo.attn_implementation=eager", f"ppo.lora.enabled={lora}", f"ppo.pack_rows={pack}"])
            trained = [trainer.actor, trainer.critic.backbone] + ([trainer.ref] if trainer.ref else [])
            others = [trainer.reward.model] + ([trainer.rollout_copy.model] if trainer.rollout_copy else [])
            assert len(trained + others) == 4
            assert [m.config._attn_implementation for m in trained] == [
                "direct_rlhf_packed_eager" if pack == "true" else "eager"] * len(trained)
            assert [m.config._attn_implementation for m in others] == ["eager"] * len(others)


@pytest.mark.parametrize("lora,checkpointing,attn", [("false", "false", "eager"), ("true", "false", "eager"),
                                                    ("false", "true", "eager"), ("false", "false", "sdpa")])
def test_packed_rows_give_the_same_rollout_experience_and_update_as_padded_ones(micro_run, tmp_path, lora,
                                                                                checkpointing, attn):
    """ppo.pack_rows: micro-batches read as one row of real tokens, attention on the rows' grid
    (eager or SDPA), give the same samples (full fine-tuning samples through the packed actor),
    reference log-probs, values, scores (a LoRA critic's reward pass) and updated weights as
    micro-batches padded per group; with gradient checkpointing too, whose recomputation must get
    the rows' layout again."""
    extra = ["ppo.micro_batch_size=3", f"ppo.lora.enabled={lora}", f"ppo.critic_lora.enabled={lora}",
             f"model.gradient_checkpointing={checkpointing}", f"ppo.attn_implementation={attn}"]
    packed, padded = (_trainer(micro_run, tmp_path / p, [*extra, f"ppo.pack_rows={p}"]) for p in ("true", "false"))
    for model in (packed.actor, packed.critic):  # the critic recomputes its layers too (a 7B critic's activations)
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing == (checkpointing == "true") for m in layers)
    assert not packed.values_in_first_epoch  # two mini-batches: the experience pass computes the values
    prompts = packed.next_prompts()
    runs = []
    for t in (packed, padded):
        torch.manual_seed(0)
        samples = t._rollout(prompts)
        score = t.reward.score(prompts, samples.texts)
        exp, _ = t.make_experience(prompts, samples, score, None)
        runs.append((samples, score, exp))
    (s_a, score_a, exp_a), (s_b, score_b, exp_b) = runs
    assert s_a.response_ids == s_b.response_ids
    torch.testing.assert_close(score_a, score_b, atol=1e-5, rtol=1e-5)
    everything = torch.arange(len(prompts), device=exp_a.mask.device)
    rows = list(packed._micro_batches(exp_a.sequences, exp_a.attention_mask, exp_a.position_ids, exp_a.mask,
                                      everything))
    assert all(mb.packed.seq.shape[1] == int(mb.attn.sum()) < mb.attn.numel() for mb in rows)  # no padding left
    packed._pack_limit = min(mb.seq.shape[1] for mb in rows)  # as a sliding window: longer rows stay padded
    widths = [(mb.seq.shape[1], mb.packed is not None) for mb in packed._micro_batches(
        exp_a.sequences, exp_a.attention_mask, exp_a.position_ids, exp_a.mask, everything)]
    assert [w <= packed._pack_limit for w, _ in widths] == [p for _, p in widths] and not all(p for _, p in widths)
    packed._pack_limit = None
    for field in ("old_logprobs", "rewards", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(exp_a, field), getattr(exp_b, field), atol=1e-5, rtol=1e-5, msg=field)
    for t in (packed, padded):
        torch.manual_seed(0)
        t.rl_step(exp_a)
    for model in ("actor", "critic"):
        for (name, a), b in zip(getattr(packed, model).named_parameters(), getattr(padded, model).parameters()):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"{model}.{name}")


def test_a_lora_actor_samples_through_its_merged_copy_as_through_itself(micro_run, tmp_path):
    """ppo.merged_rollout only changes how the policy is computed: the copy, synced after the
    adapters moved, samples the same tokens as the peft actor with the same seed, with log-probs
    equal to rounding, and leaves the actor (and so the KL reference) untouched."""
    trainer = _trainer(micro_run, tmp_path / "on", ["ppo.lora.enabled=true"])
    assert _trainer(micro_run, tmp_path / "off", ["ppo.lora.enabled=true", "ppo.merged_rollout=false"]).rollout_copy is None
    actor = trainer.acc.unwrap_model(trainer.actor)
    with torch.no_grad():
        for n, p in actor.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # adapters that change what the policy says
    before = {n: p.clone() for n, p in actor.named_parameters()}
    prompts = trainer.next_prompts()
    copy = trainer.rollout_copy.sync(actor)
    got, want = (sample(m, trainer.tokenizer, prompts, 12, seed=3, logprobs=True) for m in (copy, actor))
    with reference_mode(actor, None) as ref:
        base = sample(ref, trainer.tokenizer, prompts, 12, seed=3)
    assert got.response_ids == want.response_ids != base.response_ids
    for a, b in zip(got.logprobs, want.logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in actor.named_parameters())
    calls = []
    copy.register_forward_hook(lambda *_: calls.append(1))
    assert trainer._rollout(prompts).response_ids and calls  # the step's own rollout goes through the copy


def test_critic_lora_trains_adapters_and_head_only_and_holds_the_reward_model_inside_it(micro_run, tmp_path):
    trainer = _trainer(micro_run, tmp_path, ["ppo.critic_lora.enabled=true", "ppo.attn_implementation=eager"])
    critic = trainer.acc.unwrap_model(trainer.critic)
    assert critic.backbone.config._attn_implementation == "eager"
    params = dict(critic.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert {n.split(".")[0] for n in trained} == {"backbone", "head"}
    assert all("lora_" in n for n in trained if n.startswith("backbone."))
    before = {n: p.detach().clone() for n, p in params.items()}
    # the reward model is the critic with its adapters off: it scores as the saved folder does,
    # before and after the critic has trained
    prompts = trainer.next_prompts()
    texts = [" Paris.", " I like turtles.", " Go away.", ""] * (len(prompts) // 4)
    saved = RewardScorer(micro_run / "rm").score(prompts, texts)
    torch.testing.assert_close(trainer.reward.score(prompts, texts), saved, atol=1e-5, rtol=1e-5)
    trainer.train(stop_after=1)
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == trained  # the backbone's own weights did not move
    assert len(trainer.opt_c.state) == len(trained)  # and have no optimiser state
    torch.testing.assert_close(trainer.reward.score(prompts, texts), saved, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", ["true", "false"])
def test_experience_is_built_from_the_score_the_frozen_base_and_the_reward_models_values(micro_run, tmp_path, lora):
    """What make_experience is fed, checked piece by piece against models loaded from disk:
    - the score: normalised raw reward, clipped, plus the penalty on rows that never end;
    - the KL anchor: after the actor has trained, the reference still gives the base folder's
      log-probs (LoRA: the actor with adapters off; full fine-tuning: a frozen copy), and the
      logged sequence KL is sum(old - base log-probs) per row, averaged;
    - the values: a fresh critic's value before response token k is the reward model's score of
      prompt + response[:k] (so values sit one position left of the tokens they judge)."""

    raw = torch.tensor([9.0, -9.0, 0.5, -0.25, 4.0, -6.0, 0.0, 2.5])  # reward_stats: mean 0, std 1
    trainer = _trainer(micro_run, tmp_path, [f"ppo.lora.enabled={lora}", "ppo.reward_clip=3",
                                             "ppo.no_end_penalty=-0.75", "ppo.micro_batch_size=3"],
                       reward_fn=lambda prompts, texts: raw[:len(texts)])
    fed = {}
    build = trainer.make_experience
    trainer.make_experience = lambda p, s, score, cost: fed.setdefault("score", score) is not None and build(p, s, score, cost)
    tok, B = trainer.tokenizer, len(raw)
    rm = AutoModelForSequenceClassification.from_pretrained(micro_run / "rm").eval()
    critic_was = [p.detach().clone() for p in trainer.critic.parameters()]

    # values of the untrained critic = the reward model read at every prefix
    prompts = trainer.next_prompts()
    samples = trainer._rollout(prompts)
    exp, _ = trainer.make_experience(prompts, samples, torch.zeros(B), None)
    fed.clear()
    pids = tok(prompts, add_special_tokens=False)["input_ids"]
    for i in range(B):
        n = len(samples.response_ids[i])
        prefixes = [pids[i] + samples.response_ids[i][:k] for k in range(n)]
        # read at each prefix's last position (a tiny policy may sample PAD itself, where the saved
        # model's own pooling, the rightmost non-PAD token, would read an earlier one)
        with torch.no_grad():
            expected = torch.stack([rm.score(getattr(rm, rm.base_model_prefix)(input_ids=torch.tensor([x]))
                                             .last_hidden_state[0, -1])[0] for x in prefixes])
        torch.testing.assert_close(exp.values[i, :n].cpu(), expected, atol=1e-4, rtol=1e-4)
        assert torch.all(exp.values[i, n:] == 0)

    trainer.step()  # the actor (and critic) train
    assert any(not torch.equal(a, b) for a, b in zip(critic_was, trainer.critic.parameters()))
    ended = torch.tensor(trainer.last_samples.ended, dtype=torch.float32)
    torch.testing.assert_close(fed["score"], raw.clamp(-3, 3) - 0.75 * (1 - ended))

    # the reference after training: still the base folder's log-probs, and the actor's are not
    base = AutoModelForCausalLM.from_pretrained(micro_run / "base").eval().to(trainer.acc.device)
    assert (trainer.ref is None) == (lora == "true")  # LoRA: no second copy of the weights
    prompts = trainer.next_prompts()
    samples = trainer._rollout(prompts)
    seq, attn, pos, mask = trainer._assemble(prompts, samples.response_ids)
    whole = MicroBatch(torch.arange(B), mask.shape[1], seq, attn, pos)
    with torch.no_grad():
        with reference_mode(trainer.acc.unwrap_model(trainer.actor), trainer.ref) as ref:
            ref_lp = trainer._logprobs(ref, whole) * mask
        base_lp, actor_lp = trainer._logprobs(base, whole) * mask, trainer._logprobs(trainer.actor, whole) * mask
    torch.testing.assert_close(ref_lp, base_lp, atol=1e-5, rtol=1e-5)
    assert (actor_lp - base_lp).abs().max() > 1e-3
    _, stats = trainer.make_experience(prompts, samples, torch.zeros(B), None)
    old = torch.zeros_like(base_lp)
    for i, lp in enumerate(samples.logprobs):
        old[i, :len(lp)] = lp
    assert stats["kl/sequence"] == pytest.approx(float((old - base_lp).sum(1).mean()), abs=1e-4)


def test_reward_rises_on_a_synthetic_reward(micro_run, tmp_path):
    # reward: short answers that end their turn; the micro base rambles, so there is room to learn
    def reward_fn(prompts, texts):
        return torch.tensor([-len(t) / 20.0 for t in texts])

    trainer = _trainer(micro_run, tmp_path, ["ppo.steps=12", "ppo.adaptive_kl=false", "ppo.kl_coef=0.01"],
                       reward_fn=reward_fn)
    trainer.train()
    rows = _metrics(tmp_path)
    first, last = sum(r["reward/raw"] for r in rows[:3]) / 3, sum(r["reward/raw"] for r in rows[-3:]) / 3
    assert last > first + 0.3, (first, last)
    for key in ("kl/sequence", "policy/clipfrac", "policy/approx_kl", "values/explained_variance",
                "response/ended_rate", "policy/entropy", "loss/value", "kl/coef"):
        assert key in rows[-1]


def test_resume_reproduces_the_uninterrupted_run(micro_run, tmp_path):
    full = _trainer(micro_run, tmp_path / "full", ["ppo.steps=4"])
    full.train()
    part = _trainer(micro_run, tmp_path / "part", ["ppo.steps=4"])
    part.train(stop_after=2)  # as if killed after the checkpoint at step 2
    del part
    resumed = _trainer(micro_run, tmp_path / "part", ["ppo.steps=4"])
    resumed.train(resume=True)
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        for k in ra:
            if not k.startswith("time/"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k


def test_a_finished_run_continued_to_more_steps_equals_the_longer_run(micro_run, tmp_path, capsys):
    def ppo(out, *extra, quiet=True):
        return main([*(["-q"] if quiet else []), "ppo", "--out", str(tmp_path / out), *MICRO, *PPO_MICRO,
                     f"model.base={micro_run / 'base'}", f"ppo.reward_model={micro_run / 'rm'}",
                     f"ppo.prompts={micro_run / 'world' / 'ppo_prompts.jsonl'}", *extra])

    assert ppo("long", "ppo.steps=4") == 0
    assert ppo("short", "ppo.steps=2") == 0
    capsys.readouterr()
    # length and logging may change; the sample lines go to stderr with the bars, stdout keeps the result
    assert ppo("short", "--resume", "ppo.steps=4", "ppo.sample_every=1", quiet=False) == 0
    out, err = capsys.readouterr()
    assert out == f"policy: {tmp_path / 'short' / 'rlhf'}\n" and "[step 4]" in err
    a, b = _metrics(tmp_path / "long" / "rlhf-work"), _metrics(tmp_path / "short" / "rlhf-work")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[-1]["loss/policy"] == pytest.approx(b[-1]["loss/policy"], rel=1e-5, abs=1e-6)
    long, short = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "rlhf") for d in ("long", "short"))
    for (name, w), v in zip(long.named_parameters(), short.parameters()):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6, msg=name)
    # anything else changed: refused, and the finished policy is kept
    assert ppo("short", "--resume", "ppo.steps=6", "ppo.actor_lr=1e-3") == 2
    assert "only ppo.steps, ppo.save_every and ppo.sample_every may change" in capsys.readouterr().err
    assert ppo("short", "--resume", "ppo.steps=3") == 2  # the checkpoint is past the end
    assert (tmp_path / "short" / "rlhf" / "model.safetensors").is_file()


def test_kl_runaway_stops_training_and_a_resume_stays_stopped(micro_run, tmp_path, caplog):
    extra = ["ppo.steps=6", "ppo.kl_target=0.0001", "ppo.kl_stop=3", "ppo.kl_stop_window=2"]
    trainer = _trainer(micro_run, tmp_path, extra)
    assert trainer.train() is True  # finished: stopped, not crashed or interrupted
    rows = _metrics(tmp_path)
    stop = trainer.stopped_early
    assert stop is not None and stop["step"] == len(rows) < 6
    assert stop["mean_kl"] == pytest.approx(sum(r["kl/sequence"] for r in rows[-2:]) / 2, rel=1e-6)
    assert stop["mean_kl"] > 3 * 0.0001
    assert stop["rolled_back_to"] is None and "no checkpoint from step 0 or earlier" in stop["reason"]
    again = _trainer(micro_run, tmp_path, extra)
    with caplog.at_level("WARNING", logger="direct_rlhf"):
        assert again.train(resume=True) is True and again.step_idx == stop["step"]
    assert len(_metrics(tmp_path)) == len(rows)
    assert "stopped early and stays stopped" in caplog.text  # a longer ppo.steps would not change that
    off = _trainer(micro_run, tmp_path / "off", ["ppo.steps=3", "ppo.kl_target=0.0001", "ppo.kl_stop=0"])
    off.train()
    assert off.stopped_early is None and len(_metrics(tmp_path / "off")) == 3


def test_kl_runaway_rolls_the_policy_back_to_the_newest_checkpoint_before_the_window(micro_run, tmp_path):
    from safetensors.torch import load_file

    trainer = _trainer(micro_run, tmp_path, ["ppo.steps=8", "ppo.kl_stop=1000", "ppo.kl_stop_window=2"])
    trainer.train(stop_after=4)  # healthy so far: checkpoints at steps 2 and 4
    step2, step4 = (load_file(str(tmp_path / "checkpoints" / f"step-00000{k}" / "actor.safetensors")) for k in (2, 4))
    trainer.pc.kl_stop = 1e-9    # now any KL is a runaway: it trips at step 5, whose window is steps 4-5
    assert trainer.train() is True
    stop = trainer.stopped_early
    assert (stop["step"], stop["rolled_back_to"]) == (5, 2) and "the policy is step 2's" in stop["reason"]
    # the second train() went on after the first one's log rows, not over them
    assert [r["step"] for r in read_jsonl(tmp_path / "logs" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    actor = {n: p.cpu() for n, p in trainer.acc.unwrap_model(trainer.actor).named_parameters()}
    assert all(torch.equal(actor[n], w) for n, w in step2.items())
    assert any(not torch.equal(actor[n], w) for n, w in step4.items())
    # the stop's own checkpoint holds the rolled-back policy, so a resume saves the same one
    again = _trainer(micro_run, tmp_path, ["ppo.steps=8", "ppo.kl_stop=1000", "ppo.kl_stop_window=2"])
    assert again.train(resume=True) is True and again.stopped_early["rolled_back_to"] == 2
    resumed = {n: p.cpu() for n, p in again.acc.unwrap_model(again.actor).named_parameters()}
    assert all(torch.equal(resumed[n], w) for n, w in step2.items())


def test_ppo_cli_saves_the_trained_lora_policy_merged_into_a_plain_causal_lm(micro_run, tmp_path):
    args = ["-q", "ppo", "--out", str(tmp_path), *MICRO, *PPO_MICRO, "ppo.steps=2",
            f"model.base={micro_run / 'base'}", f"ppo.reward_model={micro_run / 'rm'}",
            f"ppo.prompts={micro_run / 'world' / 'ppo_prompts.jsonl'}", "ppo.lora.enabled=true"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert not [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "rlhf").named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(micro_run / "base").named_parameters())
    assert saved.keys() == base.keys()  # the base's own names: no adapters left, loads with no project code
    # the adapters' training is merged into the layers LoRA targets, and nothing else moved
    moved = {n for n in base if not torch.equal(saved[n], base[n])}
    assert moved and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj") for n in moved)
    assert AutoTokenizer.from_pretrained(tmp_path / "rlhf").pad_token_id is not None
    # bad input: one line, exit 2
    assert main(["-q", "ppo", "--out", str(tmp_path / "x"), *MICRO, "ppo.prompts=/nonexistent.jsonl",
                 f"model.base={micro_run / 'base'}", f"ppo.reward_model={micro_run / 'rm'}"]) == 2
    # a reward folder as the base: refused before a reward model is trained from it
    assert main(["-q", "ppo", "--out", str(tmp_path / "y"), *MICRO, f"model.base={micro_run / 'rm'}"]) == 2
    assert not (tmp_path / "y" / "reward").exists()


def test_the_gpu_is_used_unless_there_is_none_or_accelerate_launch_said_cpu(monkeypatch):
    """Every Accelerator and PartialState must agree on the device, or accelerate refuses the second
    (on a GPU machine, `accelerate launch --cpu` once failed this way)."""
    from direct_rlhf.train.common import on_cpu, training_device

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (on_cpu(), training_device().type) == (False, "cuda")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what `accelerate launch --cpu` sets
    assert (on_cpu(), training_device().type) == (True, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert (on_cpu(), training_device().type) == (True, "cpu")


def test_on_a_gpu_attention_runs_without_cudnn_and_elsewhere_as_it_was():
    """cuDNN's attention rebuilds a plan per shape (models/attention_kernels.py): on a GPU, generation
    and the PPO step leave it out and keep the other fused kernels; on the CPU nothing changes."""
    from direct_rlhf.models.attention_kernels import without_cudnn_attention

    b = torch.backends.cuda
    kernels = lambda: (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(),  # noqa: E731
                       b.math_sdp_enabled())
    before = kernels()
    assert before[0], "torch's default has cuDNN's attention on"
    with without_cudnn_attention("cpu"):
        assert kernels() == before
    with without_cudnn_attention(torch.device("cuda", 0)):
        assert kernels() == (False, True, True, True)
    assert kernels() == before


@pytest.mark.parametrize("extra", [[], ["ppo.micro_batch_tokens=60"]], ids=["rows", "token-budget"])
def test_two_processes_train_checkpoint_and_resume_as_one_run(micro_run, tmp_path, extra):
    """Two real processes on the CPU (torchrun + ACCELERATE_USE_CPU; `accelerate launch --cpu` would
    start only one): each samples its own prompts, gradients are all-reduced once per update (each
    checkpoint compares the processes' weights and fails if they differ: checked by mutation), the
    checkpoint holds both processes' RNG states, and 2 steps + a resume to 4 equal 4 steps. With a
    token budget the processes cut different numbers of micro-batches (a hang if every micro-batch
    synchronised)."""

    def run(out, *args):
        cmd = [  # one mini-batch per epoch, as by default: the critic's old values come from its first
               # training pass, and the whitening's statistics are gathered over both processes there
               "-m", "direct_rlhf", "-q", "ppo", "--out", str(out), *args, *MICRO, *PPO_MICRO,
               "ppo.mini_batch_size=8", *extra, f"model.base={micro_run / 'base'}",
               f"ppo.reward_model={micro_run / 'rm'}", f"ppo.prompts={micro_run / 'world' / 'ppo_prompts.jsonl'}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        res = torchrun(2, cmd, env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("policy: ") == 1, res.stdout  # said once, not once per process

    run(tmp_path / "a", "ppo.steps=2")
    rngs = torch.load(tmp_path / "a" / "rlhf-work" / "checkpoints" / "step-000002" / "rng.pt", weights_only=True)
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # two processes, seeded apart
    run(tmp_path / "a", "--resume", "ppo.steps=4")
    run(tmp_path / "b", "ppo.steps=4")
    resumed, whole = _metrics(tmp_path / "a" / "rlhf-work"), _metrics(tmp_path / "b" / "rlhf-work")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [1, 2, 3, 4]
    for x, y in zip(resumed, whole):
        assert {k: v for k, v in x.items() if not k.startswith("time/")} == \
            {k: v for k, v in y.items() if not k.startswith("time/")}
    assert all(torch.isfinite(torch.tensor([r["loss/policy"], r["loss/value"], r["values/mean"]])).all() for r in whole)
    assert (tmp_path / "a" / "rlhf" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "rlhf" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("critic_lora", ["false", "true"])
def test_ptx_and_lagrangian_options_train_and_move_lambda_the_right_way(micro_run, tmp_path, critic_lora):
    from direct_rlhf.io import read_jsonl

    cfg = load_config(None, [*MICRO, *PPO_MICRO, "ppo.steps=2", "ppo.ptx_coef=0.5", "ppo.lagrangian=true",
                             "ppo.cost_threshold=-100", "ppo.lambda_init=0.5", "ppo.lambda_lr=0.1",
                             f"ppo.critic_lora.enabled={critic_lora}"])
    texts = [r["text"] for r in read_jsonl(micro_run / "world" / "corpus.jsonl")]
    trainer = PPOTrainer(cfg, str(micro_run / "base"), str(micro_run / "rm"),
                         prompt_texts(micro_run / "world" / "ppo_prompts.jsonl"), tmp_path,
                         cost_path=str(micro_run / "rm"), ptx_texts=texts, progress=False)
    trainer.train()
    rows = _metrics(tmp_path)
    assert rows[0]["lagrangian/lambda"] == pytest.approx(0.5)
    assert rows[1]["lagrangian/lambda"] > 0.5  # expected cost above the threshold: lambda rises
    assert all(r["loss/ptx"] > 0 for r in rows)


def test_user_data_with_ptx_but_no_ptx_text_is_a_one_line_error(tmp_path, capsys, micro_run):
    pairs = micro_run / "world" / "pairs_train.jsonl"
    assert main(["-q", "ppo", "--out", str(tmp_path), *MICRO, f"reward.data={pairs}", "ppo.ptx_coef=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ppo.ptx_data" in err[0]
    assert not (tmp_path / "rlhf").exists()


def test_the_ppo_stage_follows_its_prompt_files_contents(micro_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = (micro_run / "world" / "ppo_prompts.jsonl").read_text().splitlines()
    prompts.write_text("\n".join(rows) + "\n")
    args = ["-q", "ppo", "--out", str(tmp_path / "run"), *MICRO, *PPO_MICRO, "ppo.steps=1", f"ppo.prompts={prompts}",
            f"model.base={micro_run / 'base'}", f"ppo.reward_model={micro_run / 'rm'}"]
    assert main(args) == 0
    stamp = (tmp_path / "run" / "rlhf" / "stage.json").read_text()
    prompts.write_text("\n".join(rows) + "\n")  # saved again, unchanged: reused
    assert main(args) == 0 and (tmp_path / "run" / "rlhf" / "stage.json").read_text() == stamp
    prompts.write_text("\n".join(rows[8:]) + "\n")  # edited in place: trained again
    assert main(args) == 0 and (tmp_path / "run" / "rlhf" / "stage.json").read_text() != stamp


@pytest.mark.parametrize("flag,name", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_ppo_under_sharding_is_a_one_line_error_before_anything_is_built(tmp_path, capsys, micro_run, monkeypatch,
                                                                         flag, name):
    monkeypatch.setenv(flag, "true")  # what `accelerate launch` with DeepSpeed or FSDP sets
    assert main(["-q", "ppo", "--out", str(tmp_path), *MICRO, f"model.base={micro_run / 'base'}",
                 f"ppo.reward_model={micro_run / 'rm'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name} is not supported" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_resume_after_a_kill_between_checkpoints_logs_each_step_once_and_a_damaged_checkpoint_is_one_line(
        micro_run, tmp_path):
    part = _trainer(micro_run, tmp_path, ["ppo.steps=4"])
    part.train(stop_after=3)  # killed after step 3; the newest checkpoint is step 2's
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3]
    del part
    with (tmp_path / "logs" / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "loss/pol')  # killed while writing a line
    _trainer(micro_run, tmp_path, ["ppo.steps=4"]).train(resume=True)
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]  # step 3 ran again, and is logged once
    samples = [json.loads(line)["step"] for line in (tmp_path / "logs" / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and len(samples) == len(set(samples)) * 3
    (tmp_path / "checkpoints" / "step-000004" / "actor.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"step-000004: damaged checkpoint .* remove it"):
        _trainer(micro_run, tmp_path, ["ppo.steps=6"]).train(resume=True)


def test_a_fresh_run_into_the_same_folder_drops_the_earlier_runs_checkpoints(micro_run, tmp_path):
    """Without --resume a run starts afresh: another run's checkpoints would otherwise outlive its
    own (pruning keeps the two highest steps) and be resumed or rolled back to."""
    from direct_rlhf.train import checkpoint

    _trainer(micro_run, tmp_path, ["ppo.steps=4", "ppo.save_every=2"]).train()  # checkpoints at 2 and 4
    _trainer(micro_run, tmp_path, ["ppo.steps=2", "ppo.save_every=1"]).train()  # a shorter run: 1 and 2
    assert [checkpoint.step_of(p) for p in checkpoint.completed(tmp_path / "checkpoints")] == [1, 2]
    again = _trainer(micro_run, tmp_path, ["ppo.steps=3", "ppo.save_every=1"])
    assert again.train(resume=True) is True and again.step_idx == 3  # continued the shorter run's step 2


def test_processes_draw_disjoint_shares_of_each_pass_over_the_prompts():
    """Data parallel: at every step each process draws its own rows, and one pass over the data
    (n prompts) hands out every prompt exactly once, in an order that is a function of the step."""
    from types import SimpleNamespace

    def draws(world: int, rank: int, steps: int, seed: int = 0) -> list[list[str]]:
        t = PPOTrainer.__new__(PPOTrainer)
        t.prompts, t.cfg = [f"p{i}" for i in range(24)], SimpleNamespace(seed=seed)
        # ppo.rollout_batch_size is the global batch: 8 prompts a step, 4 for each process
        t.pc, t.acc = SimpleNamespace(rollout_batch_size=8), SimpleNamespace(num_processes=world, process_index=rank)
        t._rollout_rows = 8 // world
        t._perm, t._perm_epoch = [], None
        out = []
        for step in range(steps):
            t.step_idx = step
            out.append(t.next_prompts())
        return out

    a, b = draws(2, 0, 6), draws(2, 1, 6)  # 6 steps x 2 processes x 4 rows = two passes over 24 prompts
    first_pass = [p for s in range(3) for p in a[s] + b[s]]
    assert sorted(first_pass) == sorted(f"p{i}" for i in range(24))
    assert sorted(p for s in range(3, 6) for p in a[s] + b[s]) == sorted(first_pass)
    assert first_pass != [p for s in range(3, 6) for p in a[s] + b[s]]  # each pass reshuffled
    assert draws(2, 1, 6) == b and draws(2, 1, 6, seed=1) != b  # a function of the step and the seed


def test_checkpoints_keep_the_newest_two_and_ignore_incomplete_folders(tmp_path):
    from direct_rlhf.train import checkpoint

    model = torch.nn.Linear(2, 2)
    stray = tmp_path / ".step-000009.abc.tmp"  # what a kill during a save leaves
    stray.mkdir(parents=True)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        checkpoint.save(tmp_path, step, {"m": model}, {}, {"step": step, "rng": [checkpoint.rng_state()]})
    assert [p.name for p in checkpoint.completed(tmp_path)] == ["step-000002", "step-000003"]
    assert not stray.exists()
    (tmp_path / "step-000004").mkdir()  # no stamp: not a checkpoint, whatever its name
    assert checkpoint.latest(tmp_path).name == "step-000003"
    with torch.no_grad():
        model.weight.zero_()
    _, state, _ = checkpoint.load(checkpoint.latest(tmp_path), {"m": model})
    assert state["step"] == 3 and torch.all(model.weight == 3)


def test_lagrangian_update_uses_the_cost_advantages_weighted_by_lambda(micro_run, tmp_path, monkeypatch):
    """PPO-Lagrangian: the actor's clipped loss sees (A_reward - lambda A_cost) / (1 + lambda), with
    this step's lambda and the cost critic's own advantages; not the reward advantages alone."""
    from direct_rlhf.algos import ppo as F

    cfg = load_config(None, [*MICRO, *PPO_MICRO, "ppo.lagrangian=true", "ppo.lambda_init=3", "ppo.lambda_lr=0"])
    trainer = PPOTrainer(cfg, str(micro_run / "base"), str(micro_run / "rm"),
                         prompt_texts(micro_run / "world" / "ppo_prompts.jsonl"), tmp_path,
                         cost_path=str(micro_run / "rm"), progress=False)
    seen = {}
    make, loss = trainer.make_experience, F.policy_loss
    monkeypatch.setattr(trainer, "make_experience", lambda *a: seen.setdefault("exp", make(*a)))
    monkeypatch.setattr(F, "policy_loss", lambda lp, old, adv, mask, eps: seen.setdefault("adv", []).append(
        (adv.detach().clone(), mask)) or loss(lp, old, adv, mask, eps))
    trainer.step()
    exp, _ = seen["exp"]
    assert exp.cost_advantages is not None and not torch.allclose(exp.cost_advantages, exp.advantages)
    # raw A_r and A_c combined, then whitened once (ppo.whiten_advantages): whitened apart, each by
    # its own spread, lambda would weigh cost against reward at a ratio that moves every step
    assert cfg.ppo.whiten_advantages
    combined = F.masked_whiten((exp.advantages - 3.0 * exp.cost_advantages) / 4.0, exp.mask)
    used = torch.cat([a[m > 0] for a, m in seen["adv"]])
    expected = combined[exp.mask > 0].repeat(cfg.ppo.ppo_epochs)  # every response token, once an epoch
    torch.testing.assert_close(used.sort().values, expected.sort().values)


def test_cost_rewards_carry_the_kl_with_the_opposite_sign(micro_run, tmp_path):
    """Safe-RLHF's ppo_lag: -kl_coef KL on every token of the reward, +kl_coef KL on every token of the
    cost, so the KL keeps its weight in (A_r - lambda A_c) / (1 + lambda) whatever lambda is. Reward
    plus cost is then the score plus the cost at the last token, and 0 everywhere else."""
    cfg = load_config(None, [*MICRO, *PPO_MICRO, "ppo.lagrangian=true", "ppo.kl_coef=0.5", "ppo.adaptive_kl=false"])
    trainer = PPOTrainer(cfg, str(micro_run / "base"), str(micro_run / "rm"),
                         prompt_texts(micro_run / "world" / "ppo_prompts.jsonl"), tmp_path,
                         cost_path=str(micro_run / "rm"), progress=False)
    prompts = trainer.next_prompts()
    samples = trainer._rollout(prompts)
    samples.logprobs = [lp + 0.2 for lp in samples.logprobs]  # the policy has moved: KL 0.2 nats a token
    score, cost = torch.randn(len(prompts)), torch.randn(len(prompts))
    exp, stats = trainer.make_experience(prompts, samples, score, cost)
    assert stats["kl/token"] == pytest.approx(0.2, abs=1e-3)
    mask = exp.mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    ends = torch.zeros_like(mask)
    ends[torch.arange(len(prompts)), last] = (score + cost) * (mask.sum(1) > 0)
    torch.testing.assert_close(exp.rewards + exp.cost_rewards, ends, atol=1e-6, rtol=0)
    before_end = (mask > 0) & (ends == 0)
    torch.testing.assert_close(exp.cost_rewards[before_end], torch.full_like(exp.cost_rewards[before_end], 0.1),
                               atol=1e-3, rtol=0)  # +0.5 * 0.2


def test_ptx_pulls_the_update_towards_the_pretraining_text(micro_run, tmp_path):
    """PPO-ptx: the same experience and seed, with and without the LM loss on pretraining text;
    with it, the actor ends nearer that text (lower LM loss on it)."""
    from direct_rlhf.io import read_jsonl

    texts = [r["text"] for r in read_jsonl(micro_run / "world" / "corpus.jsonl")][:200]
    trainers = {}
    for coef in ("0", "5"):
        # one mini-batch, so the RNG the ptx batches draw cannot reorder the updates
        cfg = load_config(None, [*MICRO, *PPO_MICRO, f"ppo.ptx_coef={coef}", "ppo.ptx_batch_size=16",
                                 "ppo.mini_batch_size=8"])
        trainers[coef] = PPOTrainer(cfg, str(micro_run / "base"), str(micro_run / "rm"),
                                    prompt_texts(micro_run / "world" / "ppo_prompts.jsonl"), tmp_path / coef,
                                    ptx_texts=texts, progress=False)
    t0 = trainers["0"]
    t0.ptx_blocks = trainers["5"].ptx_blocks  # the same text, to measure both on it
    prompts = t0.next_prompts()
    samples = t0._rollout(prompts)
    exp, _ = t0.make_experience(prompts, samples, torch.randn(len(prompts)), None)
    losses = {}
    for coef, t in trainers.items():
        if coef == "0":
            t.ptx_blocks = None  # no ptx in its update
        torch.manual_seed(0)
        stats = t.rl_step(exp)
        assert ("loss/ptx" in stats) == (coef == "5")
        with torch.no_grad():
            blocks = trainers["5"].ptx_blocks.to(t.acc.device)
            losses[coef] = t.actor(input_ids=blocks, labels=blocks).loss.item()
    assert losses["5"] < losses["0"], losses


def _reward_copy(micro_run: Path, out: Path, stats: dict | None) -> Path:
    import shutil

    shutil.copytree(micro_run / "rm", out)
    (out / "reward_stats.json").unlink()
    if stats is not None:
        (out / "reward_stats.json").write_text(json.dumps(stats))
    return out


def _critic_at_last_token(trainer: PPOTrainer, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """The critic's value at the last token of each (prompt, response), laid out as the reward model reads it."""
    from direct_rlhf.models.reward_model import encode, pad_right

    ids, mask = pad_right(encode(trainer.tokenizer, prompts, responses, 256)[0], trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        values = trainer.critic(input_ids=ids, attention_mask=mask)
    return values[torch.arange(len(ids)), mask.sum(1) - 1]


@pytest.mark.parametrize("critic_lora", ["false", "true"])
def test_the_critic_starts_on_the_normalised_scale_of_its_targets(micro_run, tmp_path, critic_lora):
    """PPO's returns are built from (raw - mean) / std; the critic, initialised from the reward
    model, predicts on that scale from its first step (a raw head predicted `raw`)."""
    rm = _reward_copy(micro_run, tmp_path / "rm", {"mean": 2.0, "std": 3.0, "max_len": 256})
    cfg = load_config(None, [*MICRO, *PPO_MICRO, f"ppo.critic_lora.enabled={critic_lora}"])
    trainer = PPOTrainer(cfg, str(micro_run / "base"), str(rm), prompt_texts(micro_run / "world" / "ppo_prompts.jsonl"),
                         tmp_path / "out", key="test", progress=False)
    prompts, responses = trainer.next_prompts()[:4], [" Paris.", " I do not know.", " Yes", " no no no"]
    raw = trainer.reward.score(prompts, responses)
    torch.testing.assert_close(_critic_at_last_token(trainer, prompts, responses), (raw - 2.0) / 3.0,
                               atol=1e-4, rtol=1e-4)


def test_a_reward_model_without_statistics_has_them_measured_on_the_base_policy(micro_run, tmp_path):
    """Bring your own reward model: a plain sequence-classification folder, no reward_stats.json.
    PPO measures mean and std on the base policy's samples, records them, and the critic starts on
    that scale; a classifier with two outputs is refused in one line."""
    rm = _reward_copy(micro_run, tmp_path / "rm", None)
    trainer = _trainer(micro_run, tmp_path / "out", reward_path=rm)
    stats = trainer.reward.stats()
    assert stats["source"].startswith("measured on 64 samples of the base policy") and stats["std"] > 0
    prompts, responses = trainer.next_prompts()[:3], [" Paris.", " Hello there", " no"]
    raw = trainer.reward.score(prompts, responses)
    torch.testing.assert_close(_critic_at_last_token(trainer, prompts, responses),
                               (raw - stats["mean"]) / stats["std"], atol=1e-4, rtol=1e-4)
    assert _trainer(micro_run, tmp_path / "again", reward_path=rm).reward.stats() == stats  # seeded: resumable
    two = AutoModelForSequenceClassification.from_pretrained(micro_run / "base", num_labels=2)
    two.save_pretrained(tmp_path / "two")
    AutoTokenizer.from_pretrained(micro_run / "base").save_pretrained(tmp_path / "two")
    with pytest.raises(UserError, match="not a reward model"):
        _trainer(micro_run, tmp_path / "out2", reward_path=tmp_path / "two")


def test_a_cost_model_without_safety_labels_is_warned_about(micro_run, tmp_path, caplog):
    """ppo.cost_threshold means 'unsafe above, safe below' only for a cost model trained with safety
    labels; one without them (here a reward folder) is used, with a warning that says so."""
    import logging

    cfg = load_config(None, [*MICRO, *PPO_MICRO, "ppo.lagrangian=true"])
    with caplog.at_level(logging.WARNING, logger="direct_rlhf"):
        PPOTrainer(cfg, str(micro_run / "base"), str(micro_run / "rm"),
                   prompt_texts(micro_run / "world" / "ppo_prompts.jsonl"), tmp_path, cost_path=str(micro_run / "rm"),
                   progress=False)
    assert any("not trained with safety labels" in r.message for r in caplog.records)
