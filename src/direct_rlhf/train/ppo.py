"""PPO from the base model: the heart of direct RLHF.

One `step()` reads top to bottom like the algorithm:

    rollout      sample responses from the actor (KV cache, stop at end of turn; a LoRA actor
                 samples through a plain copy holding its merged weights, ppo.merged_rollout);
                 the actor's log-probs of its tokens come from generation's own logits (with
                 ppo.rollout_backend=vllm: vLLM samples, the experience pass recomputes them)
    score        reward model on (prompt, response); normalise; penalise unfinished turns
    experience   log-probs of the reference, values of the critic: one forward pass each (with one
                 mini-batch per epoch, the values come from the first epoch's critic pass instead)
    advantages   KL to the base folded into per-token rewards; GAE; whitening
    rl_step      several epochs of clipped value and policy updates over mini-batches
                 (+ PPO-ptx language-modelling loss; + PPO-Lagrangian cost advantages)
    controllers  adaptive KL coefficient; Lagrange multiplier

All the math lives in `algos/ppo.py`; this file only moves tensors between models.
Shapes: B = sequences, P = prompt length (left-padded), R = response length (right-padded).
Every forward pass runs over micro-batches of rows of similar length, each cut to its own width
(`_micro_batches`), so no matrix product is spent on padding; losses are weighted by each micro-batch's
share of the mini-batch's tokens, so the update equals one pass over the whole mini-batch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..algos import ppo as F
from ..config import Config
from ..errors import UserError
from ..models.attention_kernels import without_cudnn_attention
from ..models.loading import load_tokenizer
from ..data.chat_format import chat_format, prompt_ids
from ..rollout.hf_generate import Samples, left_pad, sample
from ..rollout.policy_weights import MergedRolloutCopy
from ..tracking import MetricsLogger, open_step_log, seed_everything
from . import checkpoint, sharding
from .common import on_cpu, refuse_sharding
from .micro_batching import length_groups, packs
from .packed_rows import Packed, longest_packable, pack, use_packed_attention
from .ppo_models import SharedRewardModel, ValueModel, load_actor, load_reference, merged_policy, reference_mode

log = logging.getLogger("direct_rlhf")


@dataclass
class Experience:
    """One rollout batch with everything the PPO epochs need, all detached. The critics' values,
    and what GAE makes of them, are None until known: with one mini-batch per epoch they come from
    the first epoch's own critic forward pass (`PPOTrainer.values_in_first_epoch`)."""

    sequences: torch.Tensor       # size = (B, P+R)
    attention_mask: torch.Tensor  # size = (B, P+R)
    position_ids: torch.Tensor    # size = (B, P+R)
    mask: torch.Tensor            # size = (B, R), 1.0 on response tokens
    old_logprobs: torch.Tensor    # size = (B, R)
    rewards: torch.Tensor         # size = (B, R): -KL coefficient x KL per token, plus the score at the last
    cost_rewards: torch.Tensor | None = None  # size = (B, R): the cost at the last token (PPO-Lagrangian)
    values: torch.Tensor | None = None        # size = (B, R)
    advantages: torch.Tensor | None = None    # size = (B, R)
    returns: torch.Tensor | None = None       # size = (B, R)
    cost_values: torch.Tensor | None = None
    cost_advantages: torch.Tensor | None = None
    cost_returns: torch.Tensor | None = None


class MicroBatch(NamedTuple):
    """Rows of similar length, cut to the columns they need (see `PPOTrainer._micro_batches`);
    with ppo.pack_rows the model reads them `packed` end to end instead, without padding."""

    rows: torch.Tensor  # indices into the batch
    r: int              # response width of these rows
    seq: torch.Tensor   # size = (b, p + r)
    attn: torch.Tensor  # size = (b, p + r)
    pos: torch.Tensor   # size = (b, p + r)
    packed: Packed | None = None
    pad: bool = False   # a repeat that only keeps the processes' FSDP collectives in step: weighs nothing

    def inputs(self) -> dict[str, Any]:
        if self.packed is None:
            return {"input_ids": self.seq, "attention_mask": self.attn, "position_ids": self.pos}
        return {"input_ids": self.packed.seq, "position_ids": self.packed.pos, "packed_rows": self.packed.grid}


class PPOTrainer:
    def __init__(self, cfg: Config, base: str, reward_path: str, prompts: list[str], out: Path,
                 cost_path: str | None = None, ptx_texts: list[str] | None = None, key: str = "",
                 progress: bool = True, reward_fn=None, resume_key: str | None = None):
        """`key` names the finished run's inputs; `resume_key` those a checkpoint must share to be
        continued (the same, except the run's length: see pipeline.ensure_policy)."""
        self.cfg, self.pc, self.out, self.progress, self.key = cfg, cfg.ppo, Path(out), progress, key
        self.resume_key = resume_key or key
        refuse_sharding()
        sharding.init_processes(cfg.model.process_timeout_min)
        self.acc = Accelerator(cpu=on_cpu())
        seed_everything(cfg.seed + self.acc.process_index)
        if not prompts:
            raise UserError("no PPO prompts")
        self.fsdp = cfg.model.strategy == "fsdp"
        if self.fsdp:
            self._refuse_under_fsdp()
        # global batches (the same whatever the number of processes); each process takes its share
        self._rollout_rows = sharding.split_batch(self.pc.rollout_batch_size, "ppo.rollout_batch_size")
        self._mini_rows = sharding.split_batch(self.pc.mini_batch_size, "ppo.mini_batch_size")
        self.prompts = prompts
        self.tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
        self.chat = chat_format(cfg.model.chat_format, self.tokenizer, base)  # where a response ends
        dtype = cfg.model.dtype
        self.vllm = None
        if self.pc.rollout_backend == "vllm":  # first: vLLM sizes its share from the GPU's free memory
            from ..rollout.vllm_generate import VLLMSampler

            self.vllm = VLLMSampler(base, self.tokenizer, dtype, self.pc.vllm_gpu_memory_utilization,
                                    cfg.seed + self.acc.process_index, self.acc.num_processes)
        actor = load_actor(base, dtype, self.pc.lora, cfg.model.trust_remote_code, cfg.model.gradient_checkpointing)
        self.ref = load_reference(base, dtype, self.pc.lora, cfg.model.trust_remote_code)
        self.rollout_copy = (MergedRolloutCopy(base, cfg.model.trust_remote_code)
                             if self.vllm is None and self.pc.lora.enabled and self.pc.merged_rollout else None)
        critic = ValueModel.from_reward_model(reward_path, dtype, self.pc.critic_lora, cfg.model.trust_remote_code,
                                              cfg.model.gradient_checkpointing)
        # scored in length-sorted chunks of micro_batch_size rows (and micro_batch_tokens positions), like
        # every other forward pass here:
        # one padded batch of the whole rollout took twice as long (docs/performance.md)
        self.reward = self._scorer(reward_path, critic)
        # tests and custom objectives may replace the learned reward by a function of the text
        self.reward_fn = reward_fn or self.reward.score
        rollout_model = self.rollout_copy.model if self.rollout_copy else None
        self._use_attention(actor, critic.backbone, self.ref, packed=True)
        self._use_attention(self._own_model(self.reward), rollout_model)
        windows = [w for w in (longest_packable(actor.config), longest_packable(critic.backbone.config)) if w]
        self._pack_limit = min(windows, default=None)
        if self.fsdp:  # each model sharded by its own fully_shard, then given its own optimiser
            self.actor, self.critic = self._shard(actor), critic.to(self.acc.device)  # critic: once on its scale
            self.opt_a = self._adamw(self.actor, self.pc.actor_lr)
            self.ref = self._shard(self.ref, frozen=True) if self.ref is not None else None
        else:
            opt_a, opt_c = self._adamw(actor, self.pc.actor_lr), self._adamw(critic, self.pc.critic_lr)
            self.actor, self.critic, self.opt_a, self.opt_c = self.acc.prepare(actor, critic, opt_a, opt_c)
        for frozen in (self.ref, rollout_model):
            if frozen is not None:
                frozen.to(self.acc.device)
        if self.reward.mean is None:  # a reward model brought without reward_stats.json
            self._measure_reward_stats()
        # the critic predicts the normalised score that its targets are built from, from the first step
        self.acc.unwrap_model(self.critic).start_on_normalised_scale(self.reward.mean, self.reward.std)
        if self.fsdp:
            self.critic = self._shard(self.critic)
            self.opt_c = self._adamw(self.critic, self.pc.critic_lr)
        self.lagrangian = self.pc.lagrangian
        if self.lagrangian:
            if not cost_path:
                raise UserError("ppo.lagrangian needs a cost model (train one with `direct-rlhf reward --cost`)")
            cost_critic = ValueModel.from_reward_model(cost_path, dtype, self.pc.critic_lora,
                                                       cfg.model.trust_remote_code, cfg.model.gradient_checkpointing)
            self.cost = self._scorer(cost_path, cost_critic)
            self._warn_without_cost_zero(cost_path)
            self._use_attention(cost_critic.backbone, packed=True)
            self._use_attention(self._own_model(self.cost))
            if self.fsdp:
                self.cost_critic = self._shard(cost_critic)
                self.opt_cc = self._adamw(self.cost_critic, self.pc.critic_lr)
            else:
                opt_cc = self._adamw(cost_critic, self.pc.critic_lr)
                self.cost_critic, self.opt_cc = self.acc.prepare(cost_critic, opt_cc)
            self.lam = F.LagrangeMultiplier(self.pc.lambda_init, self.pc.lambda_lr)
        self.kl_ctl = (F.AdaptiveKLController(self.pc.kl_coef, self.pc.kl_target, self.pc.kl_horizon)
                       if self.pc.adaptive_kl else F.FixedKLController(self.pc.kl_coef))
        self.ptx_blocks = self._ptx_blocks(ptx_texts) if self.pc.ptx_coef > 0 else None
        # With one mini-batch per epoch, the critics see every row before their first update, so
        # the first epoch's forward pass gives the old values the experience pass would have
        # computed: one forward pass of each critic fewer per step, the same update.
        self.values_in_first_epoch = self.pc.mini_batch_size >= self.pc.rollout_batch_size
        self.step_idx = 0
        self.recent_kl: list[float] = []              # sequence KL of the last kl_stop_window steps
        self.stopped_early: dict[str, Any] | None = None
        self._perm: list[int] = []
        self._perm_epoch: int | None = None

    def _refuse_under_fsdp(self) -> None:
        """model.strategy=fsdp trains every weight of the actor and critics; what it does not cover is one line."""
        pc = self.pc
        for on, what in ((pc.lora.enabled, "ppo.lora.enabled"), (pc.critic_lora.enabled, "ppo.critic_lora.enabled")):
            if on:
                raise UserError(f"ppo under model.strategy=fsdp trains every parameter: set {what}=false "
                                "(LoRA is the single-process option, with model.strategy=ddp)")
        if pc.rollout_backend == "vllm":
            raise UserError("ppo.rollout_backend=vllm is not supported with model.strategy=fsdp; use "
                            "ppo.rollout_backend=hf")

    def _shard(self, model: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
        """`model` sharded; a value model's float32 head stays float32 under bf16 compute (as gathered
        by the root it would come in bf16 and meet the float32 input its head casts to)."""
        mc = self.cfg.model
        heads = [model.head] if isinstance(model, ValueModel) else []
        return sharding.shard(model.to(self.acc.device), "fsdp", mc.dtype, mc.fsdp_cpu_offload, self.acc.device,
                              frozen=frozen, float32=heads)

    @staticmethod
    def _warn_without_cost_zero(path: str) -> None:
        """ppo.cost_threshold compares the raw cost with a number; it means 'unsafe above, safe below'
        only for a cost model trained with safety labels (its reward_stats.json says so with "zero")."""
        import json

        from ..models.reward_model import STATS_FILE

        stats_file = Path(path) / STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        if "zero" not in stats:
            log.warning("ppo: the cost model %s was not trained with safety labels, so its 0 does not separate unsafe "
                        "from safe answers and ppo.cost_threshold has no defined meaning (docs/ppo-lagrangian.md); "
                        "retrain it with 'direct-rlhf reward --cost'", path)

    @torch.no_grad()
    def _measure_reward_stats(self, n: int = 64) -> None:
        """The reward's normalisation statistics, measured on the base policy's responses to a seeded
        sample of up to `n` PPO prompts (split over the processes, scores gathered), for a reward
        model that has none recorded. Deterministic for a given seed, so a resumed run measures the same."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + 999_983)
        chosen = torch.randperm(len(self.prompts), generator=gen)[:n].tolist()
        mine = [self.prompts[i] for i in chosen[self.acc.process_index::self.acc.num_processes]]
        scores = self.reward.score(mine, self._rollout(mine).texts).to(self.acc.device)
        every = self.acc.gather_for_metrics(scores).cpu() if self.acc.num_processes > 1 else scores.cpu()
        self.reward.set_stats(every, "samples of the base policy on PPO prompts")
        log.info("ppo: reward statistics %s (mean %.3f, std %.3f)", self.reward.stats_source, self.reward.mean,
                 self.reward.std)

    # ------------------------------------------------------------------ data
    def next_prompts(self) -> list[str]:
        """This process's prompts for the current step: a seeded permutation per pass over the
        data, so the data position is a pure function of the step (resume needs nothing else)."""
        n, b = len(self.prompts), self._rollout_rows  # ppo.rollout_batch_size is the global batch
        start = self.step_idx * self.pc.rollout_batch_size + self.acc.process_index * b
        out = []
        for i in range(start, start + b):
            epoch, pos = divmod(i, n)
            out.append(self.prompts[self._permutation(epoch)[pos]])
        return out

    def _permutation(self, epoch: int) -> list[int]:
        """The prompt order of one pass over the data, drawn once per pass (not once per prompt)."""
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.prompts), generator=gen).tolist(), epoch
        return self._perm

    def _ptx_blocks(self, texts: list[str] | None) -> torch.Tensor:
        from .pretrain import pack

        if not texts:
            raise UserError("ppo.ptx_coef > 0 needs pretraining text (ppo.ptx_data)")
        return pack(self.tokenizer, texts, min(self.cfg.pretrain.seq_len, 128))

    # ------------------------------------------------------------------ the step
    def step(self) -> dict[str, Any]:
        with without_cudnn_attention(self.acc.device):  # shapes change all the time (models/attention_kernels.py)
            return self._run_step()

    def _run_step(self) -> dict[str, Any]:
        pc, t0 = self.pc, self._clock()
        prompts = self.next_prompts()
        samples = self._rollout(prompts)
        t_gen = self._clock()
        with self._autocast():  # the scorers (the trainer's own forwards autocast in their helpers)
            raw = self.reward_fn(prompts, samples.texts)  # size = (B,)
            cost = self.cost.score(prompts, samples.texts) if self.lagrangian else None
        ended = torch.tensor(samples.ended, dtype=torch.float32)
        score = self.reward.normalise(raw).clamp(-pc.reward_clip, pc.reward_clip) + pc.no_end_penalty * (1 - ended)
        t_score = self._clock()
        exp, stats = self.make_experience(prompts, samples, score, cost)
        t_exp = self._clock()
        stats.update(self.rl_step(exp))
        t_train = self._clock()

        stats.update(self._reduce({
            "reward/raw": raw.mean(), "reward/normalised": self.reward.normalise(raw).mean(),
            "reward/score": score.mean(), "response/length": torch.tensor([len(r) for r in samples.response_ids],
                                                                          dtype=torch.float32).mean(),
            "response/ended_rate": ended.mean(),
            **({"cost/mean": cost.mean()} if cost is not None else {}),
        }))
        self.kl_ctl.update(stats["kl/sequence"], pc.rollout_batch_size)
        stats["kl/coef"] = self.kl_ctl.value
        if self.lagrangian:
            stats["lagrangian/lambda"] = self.lam.value  # the lambda used in this step's update
            self.lam.update(stats["cost/mean"], pc.cost_threshold)
        stats.update({"time/generate_s": t_gen - t0, "time/score_s": t_score - t_gen,
                      "time/experience_s": t_exp - t_score, "time/train_s": t_train - t_exp,
                      "time/step_s": t_train - t0})
        self.step_idx += 1
        self.last_samples = samples
        return stats

    def _clock(self) -> float:
        """Seconds, after the accelerator's queued work has run: on a GPU, kernels run after the call
        that queued them returns, so without the wait one phase's work would be timed in the next."""
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)
        return time.perf_counter()

    def _rollout(self, prompts: list[str]) -> Samples:
        pc, policy = self.pc, self.acc.unwrap_model(self.actor)
        if self.vllm is not None:  # outside autocast: vLLM runs its own kernels in its own dtype
            self.vllm.load_weights(policy)
            return self.vllm.sample(prompts, pc.max_new_tokens, pc.temperature, pc.top_p, self.chat.stop_strings)
        if self.rollout_copy is not None:
            policy = self.rollout_copy.sync(policy)
        # a sharded actor samples with its weights gathered for the call (unshard/reshard); each process then
        # stops when its own rows end. A gathered copy (rollout/policy_weights.actor_weights) sampled about
        # as fast (benchmarks/sharding_memory.py, docs/performance.md) but holds a second model in each process
        with self._autocast(), sharding.whole_weights(policy):
            return sample(policy, self.tokenizer, prompts, pc.max_new_tokens, pc.temperature, pc.top_p,
                          batch_size=len(prompts), logprobs=True, stop_strings=self.chat.stop_strings)

    @torch.no_grad()
    def make_experience(self, prompts: list[str], samples: Samples, score: torch.Tensor,
                        cost: torch.Tensor | None) -> tuple[Experience, dict[str, float]]:
        pc, dev = self.pc, self.acc.device
        seq, attn, pos, mask = self._assemble(prompts, samples.response_ids)
        B, R = mask.shape
        old_lp = torch.zeros(B, R, device=dev)                                      # size = (B, R)
        for i, lp in enumerate(samples.logprobs or []):  # None from vLLM: recomputed below
            old_lp[i, :len(lp)] = lp.to(dev)
        ref_lp = torch.zeros(B, R, device=dev)
        critics = [] if self.values_in_first_epoch else [c for c, *_ in self._critics()]
        values = [torch.zeros(B, R, device=dev) for _ in critics]
        actor = self.acc.unwrap_model(self.actor)
        for mb in self._micro_batches(seq, attn, pos, mask, torch.arange(B, device=dev)):
            rows, r = mb.rows, mb.r
            if samples.logprobs is None:
                old_lp[rows, :r] = self._logprobs(actor, mb)
            with reference_mode(actor, self.ref) as ref:
                ref_lp[rows, :r] = self._logprobs(ref, mb)
            for critic, v in zip(critics, values):
                v[rows, :r] = self._values(critic, mb)
        old_lp, ref_lp = old_lp * mask, ref_lp * mask
        rewards, kl = F.shape_rewards(score.to(dev), old_lp, ref_lp, mask, self.kl_ctl.value, pc.kl_estimator)
        exp = Experience(seq, attn, pos, mask, old_lp, rewards)
        if cost is not None:  # the KL on the cost side too, opposite sign: its weight then holds for every lambda
            exp.cost_rewards = F.shape_costs(cost.to(dev), old_lp, ref_lp, mask, self.kl_ctl.value, pc.kl_estimator)
        stats = {"kl/sequence": (kl * mask).sum(1).mean(), "kl/token": F.masked_mean(kl, mask)}
        if critics:
            stats.update(self._advantages(exp, *values))
        return exp, self._reduce(stats)

    def _advantages(self, exp: Experience, values: torch.Tensor,
                    cost_values: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Fill in the critics' values and GAE's advantages and returns (whitened with the whole
        batch's statistics, over all processes; PPO-Lagrangian's stay raw, for rl_step to combine
        with lambda and whiten once); returns the value statistics."""
        pc, mask = self.pc, exp.mask
        exp.values = values * mask
        exp.advantages, exp.returns = F.gae(exp.rewards, exp.values, mask, pc.gamma, pc.lam)
        if cost_values is not None:
            exp.cost_values = cost_values * mask
            exp.cost_advantages, exp.cost_returns = F.gae(exp.cost_rewards, exp.cost_values, mask, pc.gamma, pc.lam)
        stats = {"values/mean": F.masked_mean(exp.values, mask), "returns/mean": F.masked_mean(exp.returns, mask),
                 "values/explained_variance": F.explained_variance(exp.values, exp.returns, mask)}
        if pc.whiten_advantages and not self.lagrangian:
            all_sum = self._all_sum if self.acc.num_processes > 1 else None
            exp.advantages = F.masked_whiten(exp.advantages, mask, all_sum=all_sum)
        return stats

    def _critics(self) -> list[tuple[Any, Any, str]]:
        """(critic, optimiser, prefix of its fields in Experience: "" or "cost_")."""
        critics = [(self.critic, self.opt_c, "")]
        if self.lagrangian:
            critics.append((self.cost_critic, self.opt_cc, "cost_"))
        return critics

    def rl_step(self, exp: Experience) -> dict[str, float]:
        """PPO epochs over mini-batches; every token's loss weighted equally (masked means). Each
        mini-batch updates the critics, then the actor (separate models and optimisers: the order
        changes nothing); an experience without values gets them from the first critic pass."""
        pc, (B, R) = self.pc, exp.mask.shape
        pending = exp.values is None
        if pending:
            exp = replace(exp)  # filled in below; the caller's stays as it was
        sums: dict[str, float] = {}
        value_stats: dict[str, float] = {}
        adv = None  # the actor's advantages: known once the critics' values are
        n = 0
        for _ in range(pc.ppo_epochs):
            for idx in torch.randperm(B, device=exp.mask.device).split(self._mini_rows):
                if pending and len(idx) < B:
                    raise RuntimeError("values from the first epoch need one mini-batch per epoch")
                micro = list(self._micro_batches(exp.sequences, exp.attention_mask, exp.position_ids, exp.mask, idx))
                total = self._tokens_per_process(exp.mask[idx])
                stats: dict[str, torch.Tensor] = {}
                # critics: clipped value loss, accumulated over micro-batches
                fresh = []
                for critic, opt, field in self._critics():
                    old = torch.zeros(B, R, device=exp.mask.device) if pending else getattr(exp, f"{field}values")
                    opt.zero_grad(set_to_none=True)
                    for mb in self._accumulating(critic, micro):
                        rows, r = mb.rows, mb.r
                        mask = exp.mask[rows, :r]
                        w = mask.sum() / total * (not mb.pad)  # its share of the mini-batch's tokens
                        values = self._values(critic, mb)
                        if pending:  # this is the rollout's critic: its values are the old ones
                            old[rows, :r] = values.detach() * mask
                            rewards = getattr(exp, f"{field}rewards")[rows, :r]
                            returns = F.gae(rewards, old[rows, :r], mask, pc.gamma, pc.lam)[1]
                        else:
                            returns = getattr(exp, f"{field}returns")[rows, :r]
                        vf_loss, vf_stats = F.value_loss(values, old[rows, :r], returns, mask, pc.value_clip_eps)
                        self.acc.backward(pc.vf_coef * vf_loss * w)
                        for stat, v in ((f"loss/{field}value", vf_loss),
                                        (f"{field}values/clipfrac", vf_stats["vf_clipfrac"])):
                            stats[stat] = stats.get(stat, 0.0) + w * v.detach()
                    self._step(critic, opt)
                    fresh.append(old)
                if pending:
                    value_stats = self._reduce(self._advantages(exp, *fresh))
                    pending = False
                if adv is None:
                    adv = exp.advantages
                    if self.lagrangian:  # raw A_r and A_c, so lambda weighs cost against reward as set; then
                        # whitened once (whitened apart, each by its own spread, their ratio would drift)
                        adv = F.lagrangian_advantages(exp.advantages, exp.cost_advantages, self.lam.value)
                        if pc.whiten_advantages:
                            adv = F.masked_whiten(adv, exp.mask,
                                                  all_sum=self._all_sum if self.acc.num_processes > 1 else None)
                # actor: clipped surrogate (+ entropy bonus), accumulated over micro-batches
                self.opt_a.zero_grad(set_to_none=True)
                for mb in self._accumulating(self.actor, micro, sync_last=self.ptx_blocks is None):
                    rows, r = mb.rows, mb.r
                    mask = exp.mask[rows, :r]
                    w = mask.sum() / total * (not mb.pad)
                    logits = self._response_logits(self.actor, mb)  # size = (b, r, V)
                    logprobs = F.logprobs_from_logits(logits, mb.seq[:, -r:])
                    pg_loss, pg_stats = F.policy_loss(logprobs, exp.old_logprobs[rows, :r], adv[rows, :r], mask,
                                                      pc.clip_eps)
                    entropy = F.masked_mean(F.entropy_from_logits(logits if pc.entropy_coef else logits.detach()),
                                            mask)
                    self.acc.backward((pg_loss - pc.entropy_coef * entropy) * w)
                    for name, v in {"loss/policy": pg_loss, "policy/entropy": entropy,
                                    "policy/clipfrac": pg_stats["clipfrac"], "policy/approx_kl": pg_stats["approx_kl"]}.items():
                        stats[name] = stats.get(name, 0.0) + w * v.detach()
                if self.ptx_blocks is not None:
                    ptx_loss = self._ptx_loss()
                    self.acc.backward(pc.ptx_coef * ptx_loss)  # outside no_sync: this one all-reduces
                    stats["loss/ptx"] = ptx_loss.detach()
                self._step(self.actor, self.opt_a)
                for name, v in stats.items():
                    sums[name] = sums.get(name, 0.0) + float(v)
                n += 1
        return {**value_stats, **self._reduce({k: torch.tensor(v / n) for k, v in sums.items()})}

    def _micro_batches(self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                       idx: torch.Tensor) -> Iterator[MicroBatch]:
        """Split rows `idx` into micro-batches of rows of similar length (`length_groups`: by rows,
        and by token positions with ppo.micro_batch_tokens), each cut to the columns it needs: its
        longest prompt's start .. its longest response's end. Left-padded prompts and right-padded
        responses make that one contiguous slice per micro-batch."""
        R = mask.shape[1]
        P = attn.shape[1] - R
        prompt_len, resp_len = attn[:, :P].sum(1), mask.sum(1)
        order = idx[torch.argsort(prompt_len[idx] + resp_len[idx], descending=True, stable=True)]
        pc = self.pc
        groups = length_groups(prompt_len[order].long().tolist(), resp_len[order].long().tolist(),
                               pc.micro_batch_size, pc.micro_batch_tokens, pc.pack_rows, self._pack_limit)
        # every forward pass of a sharded model is collective: as many on every process (agreed
        # before the first, which the caller may run before asking for the next)
        pads = sharding.most(len(groups)) - len(groups) if self.fsdp else 0
        for rows in (order[g] for g in groups):
            r = max(1, int(resp_len[rows].max()))
            cols = slice(P - int(prompt_len[rows].max()), P + r)
            mb = MicroBatch(rows, r, seq[rows][:, cols], attn[rows][:, cols], pos[rows][:, cols])
            if packs(mb.seq.shape[1], pc.pack_rows, self._pack_limit):
                mb = mb._replace(packed=pack(mb.seq, mb.attn, mb.pos, prompt_len[rows], resp_len[rows], r))
            yield mb
        for _ in range(pads):
            yield mb._replace(pad=True)

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        """bfloat16 autocast for forward passes when ppo.bf16 (backward passes run outside it)."""
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.pc.bf16)

    def _use_attention(self, *models, packed: bool = False) -> None:
        """ppo.attn_implementation for each model; with ppo.pack_rows, the models that read packed
        micro-batches (`packed`) then attend on a grid of the rows."""
        for model in filter(None, models):
            if self.pc.attn_implementation:
                model.set_attn_implementation(self.pc.attn_implementation)
            if packed and self.pc.pack_rows:
                use_packed_attention(model)

    def _scorer(self, path: str, critic: ValueModel):
        """The reward (or cost) model; with a LoRA critic, the one inside it (no second copy)."""
        from ..models.reward_model import RewardScorer

        shared = SharedRewardModel(critic) if critic.reward_head is not None else None
        return RewardScorer(path, device=str(self.acc.device), batch_size=self.pc.micro_batch_size, model=shared,
                            max_tokens=self.pc.micro_batch_tokens, dtype=self.cfg.model.dtype,
                            trust_remote_code=self.cfg.model.trust_remote_code, max_len=self.cfg.reward.max_len)

    @staticmethod
    def _own_model(scorer) -> torch.nn.Module | None:
        return None if isinstance(scorer.model, SharedRewardModel) else scorer.model

    def _adamw(self, model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
        """AdamW over the trained parameters only (LoRA leaves the rest frozen)."""
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=self.pc.weight_decay)

    def _accumulating(self, model, micro: list[MicroBatch], sync_last: bool = True) -> Iterator[MicroBatch]:
        """The micro-batches, each with its forward *and* backward (the caller's loop body) inside
        `no_sync` but the last: DDP decides at the forward whether that backward all-reduces, so
        gradients are all-reduced once an update, however many micro-batches each process cut."""
        if self.fsdp:  # FSDP2: gradients kept local (unreduced) until the last micro-batch's backward
            for k, mb in enumerate(micro):
                sharding.gradient_sync(model, sync_last and k == len(micro) - 1)
                yield mb
            sharding.gradient_sync(model, True)  # PPO-ptx's backward, after these, reduces
            return
        for k, mb in enumerate(micro):
            with contextlib.nullcontext() if sync_last and k == len(micro) - 1 else self.acc.no_sync(model):
                yield mb

    def _step(self, model, opt) -> None:
        if self.fsdp:
            sharding.clip_grad_norm(model, self.pc.grad_clip)  # the norm of the sharded gradients, over processes
        else:
            self.acc.clip_grad_norm_(model.parameters(), self.pc.grad_clip)
        opt.step()

    def _tokens_per_process(self, mask: torch.Tensor) -> torch.Tensor:
        """The mini-batch's response tokens over every process, / the number of processes: each
        micro-batch's loss weighed by its tokens over this gives, once the gradient reduction has
        averaged the processes, the token mean over the whole global mini-batch (as one process)."""
        total = mask.sum()
        if self.acc.num_processes > 1:
            total = self._all_sum(total) / self.acc.num_processes
        return total.clamp(min=1.0)

    def _ptx_loss(self) -> torch.Tensor:
        idx = torch.randint(len(self.ptx_blocks), (self.pc.ptx_batch_size,))
        batch = self.ptx_blocks[idx].to(self.acc.device)
        with self._autocast():
            return self.actor(input_ids=batch, labels=batch).loss

    def _assemble(self, prompts: list[str], responses: list[list[int]]):
        return assemble(self.tokenizer, prompts, responses, self.acc.device)

    def _response_logits(self, model, mb: MicroBatch) -> torch.Tensor:
        # only the r positions that predict response tokens go through the LM head
        with self._autocast():
            if mb.packed is None:
                logits = model(**mb.inputs(), logits_to_keep=mb.r + 1).logits[:, :-1]
            else:
                logits = model(**mb.inputs(), logits_to_keep=mb.packed.keep).logits.view(len(mb.rows), mb.r, -1)
        return logits.float() / self.pc.temperature

    def _logprobs(self, model, mb: MicroBatch) -> torch.Tensor:
        return F.logprobs_from_logits(self._response_logits(model, mb), mb.seq[:, -mb.r:])

    def _values(self, critic, mb: MicroBatch) -> torch.Tensor:
        """The critic's value before each response token; size = (b, r)."""
        with self._autocast():
            values = critic(**mb.inputs())
        return values[:, -mb.r - 1:-1] if mb.packed is None else values[0, mb.packed.keep].view(len(mb.rows), mb.r)

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, reduction="sum")

    def _reduce(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means across processes (identity on one process)."""
        if not stats:
            return {}
        keys = list(stats)
        vec = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32).detach().cpu() for k in keys])
        if self.acc.num_processes > 1:
            vec = self.acc.reduce(vec.to(self.acc.device), reduction="mean").cpu()
        return {k: float(v) for k, v in zip(keys, vec)}

    # ------------------------------------------------------------------ checkpoints
    def _models(self) -> dict[str, torch.nn.Module]:
        models = {"actor": self.acc.unwrap_model(self.actor), "critic": self.acc.unwrap_model(self.critic)}
        if self.lagrangian:
            models["cost_critic"] = self.acc.unwrap_model(self.cost_critic)
        return models

    def _check_processes_agree(self) -> None:
        """With several processes, every one must hold the same trained weights (DDP all-reduces
        their gradients), since a checkpoint saves only the main process's: compared by checksum."""
        sums = torch.stack([sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad)
                            for model in self._models().values()])
        every = self.acc.gather(sums.to(self.acc.device)).view(self.acc.num_processes, -1).cpu()
        if not torch.allclose(every, every[:1].expand_as(every), rtol=1e-6, atol=1e-9):
            raise RuntimeError(f"step {self.step_idx}: the processes' trained weights differ "
                               f"(checksums per process: {every.tolist()}); gradients were not all-reduced")

    def _sharded_models(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        """Under fsdp, each trained model with its optimiser, as a DCP checkpoint holds them."""
        models = {"actor": (self.actor, self.opt_a), "critic": (self.critic, self.opt_c)}
        if self.lagrangian:
            models["cost_critic"] = (self.cost_critic, self.opt_cc)
        return models

    def save_checkpoint(self) -> None:
        if self.acc.num_processes > 1:
            if not self.fsdp:  # sharded weights differ by design
                self._check_processes_agree()
            rngs = checkpoint.gathered_rng_states(gather_object)
        else:
            rngs = [checkpoint.rng_state()]
        shards = None
        if self.fsdp:  # every process writes its shards of weights and optimiser states (DCP)
            shards = self.out / "checkpoints" / f".step-{self.step_idx:06d}.shards.tmp"
            sharding.save_models(shards, self._sharded_models(), None)
        if self.acc.is_main_process:
            states = {} if self.fsdp else {"opt_a": self.opt_a.state_dict(), "opt_c": self.opt_c.state_dict()}
            if self.lagrangian and not self.fsdp:
                states["opt_cc"] = self.opt_cc.state_dict()
            trainer_state = {"step": self.step_idx, "key": self.key, "resume_key": self.resume_key,
                             "kl_ctl": self.kl_ctl.state_dict(), "rng": rngs,
                             "recent_kl": self.recent_kl, "stopped_early": self.stopped_early,
                             "lambda": self.lam.state_dict() if self.lagrangian else None,
                             "config": asdict(self.pc)}
            checkpoint.save(self.out / "checkpoints", self.step_idx, {} if self.fsdp else self._models(), states,
                            trainer_state, world_size=self.acc.num_processes, shards=shards)
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        path = checkpoint.latest(self.out / "checkpoints")
        if path is None:
            return False
        ts = checkpoint.trainer_state(path)
        same = ts["resume_key"] == self.resume_key if "resume_key" in ts else ts.get("key") == self.key
        if not same:
            raise UserError(f"{path}: checkpoint was made with another config or inputs (only ppo.steps, "
                            f"ppo.save_every and ppo.sample_every may change); remove {path.parent} "
                            f"or run without --resume")
        if ts["step"] > self.pc.steps:
            raise UserError(f"{path}: checkpoint is at step {ts['step']}, past ppo.steps={self.pc.steps}")
        if self.fsdp:  # resharded to this run's processes, however many saved it
            states, ts, rngs = checkpoint.load(path, {})
            with checkpoint.readable(path):
                sharding.load_models(path / checkpoint.SHARDS, self._sharded_models())
        else:
            states, ts, rngs = checkpoint.load(path, self._models())
            if len(rngs) != self.acc.num_processes:
                raise UserError(f"{path}: saved with {len(rngs)} processes, resuming with {self.acc.num_processes}")
            self.opt_a.load_state_dict(states["opt_a"])
            self.opt_c.load_state_dict(states["opt_c"])
            if self.lagrangian:
                self.opt_cc.load_state_dict(states["opt_cc"])
        if self.lagrangian:
            self.lam.load_state_dict(ts["lambda"])
        self.kl_ctl.load_state_dict(ts["kl_ctl"])
        self.recent_kl, self.stopped_early = list(ts.get("recent_kl", [])), ts.get("stopped_early")
        if len(rngs) == self.acc.num_processes:
            checkpoint.set_rng_state(rngs[self.acc.process_index])
        else:  # fsdp on another number of processes: sampling cannot continue as it would have; seeded afresh
            log.warning("ppo: %s was saved by %d processes, resumed by %d: the random draws (sampling) restart from "
                        "a seed", path, len(rngs), self.acc.num_processes)
            seed_everything(self.cfg.seed + 1000 * ts["step"] + self.acc.process_index)
        self.step_idx = ts["step"]
        log.info("ppo: resumed from %s (step %d)", path, self.step_idx)
        if self.stopped_early is not None and self.step_idx < self.pc.steps:
            log.warning("ppo: this run stopped early and stays stopped, whatever ppo.steps says: %s",
                        self.stopped_early["reason"])
        return True

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False, stop_after: int | None = None, guard=None) -> bool:
        """Run to `ppo.steps` (or stop after `stop_after` steps, for tests); True when finished.
        `guard` (train/balance_guard.py) evaluates the policy every ppo.eval_every steps and at the
        end, and chooses the step to keep (`guard.selection`)."""
        if resume and not self.resume():
            log.warning("ppo: --resume, but no checkpoint in %s yet; starting from step 0", self.out / "checkpoints")
        elif self.step_idx == 0 and self.acc.is_main_process:  # a fresh start: no other run's checkpoints
            checkpoint.clear(self.out / "checkpoints")
        # a resumed run logs the steps after its checkpoint again; a trainer that already ran steps in
        # this process (train(stop_after=...), then train()) goes on after its own rows
        resume_from = self.step_idx if resume or self.step_idx else None
        logger = MetricsLogger(self.out / "logs", resume_from=resume_from) if self.acc.is_main_process else None
        samples_log = open_step_log(self.out / "logs" / "samples.jsonl", resume_from) \
            if self.acc.is_main_process else None
        bar = tqdm(total=self.pc.steps, initial=self.step_idx, desc="ppo",
                   disable=not (self.progress and self.acc.is_main_process), dynamic_ncols=True)
        done, val = 0, {}
        try:
            if guard is not None:
                guard.start(self)
            while (self.step_idx < self.pc.steps and self.stopped_early is None
                   and (stop_after is None or done < stop_after)):
                stats = self.step()
                done += 1
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward/raw']:.2f}", kl=f"{stats['kl/sequence']:.2f}",
                                ended=f"{stats['response/ended_rate']:.2f}", **val)
                if self._kl_ran_away(stats["kl/sequence"]):
                    self._roll_back()
                    log.warning("ppo: stopped early at step %d: %s", self.step_idx, self.stopped_early["reason"])
                evaluate = guard is not None and guard.due(self)
                if evaluate and (record := guard.after_step(self)):  # logged in this step's row
                    stats.update({f"val/{k}": v for k, v in record.items() if k not in ("step", "passes")
                                  and v is not None})
                    val = {k[:3]: f"{record[k]:.2f}" for k in ("general_acc", "toxicity", "win_rate")
                           if record.get(k) is not None}
                if logger:
                    logger.log(self.step_idx, stats)
                    if self.step_idx % self.pc.sample_every == 0 or self.step_idx == 1:
                        self._log_samples(samples_log, bar)
                if (self.step_idx % self.pc.save_every == 0 or self.step_idx == self.pc.steps
                        or self.stopped_early is not None):
                    self.save_checkpoint()
                if evaluate:
                    guard.keep(self)
            finished = self.step_idx >= self.pc.steps or self.stopped_early is not None
            if guard is not None and finished:
                guard.finish(self)
        finally:
            bar.close()
            if logger:
                logger.close()
                samples_log.close()
        return finished

    def checkpoint_path(self, step: int) -> Path:
        """The folder of step `step`'s checkpoint (it may not exist)."""
        return self.out / "checkpoints" / f"step-{step:06d}"

    def load_actor(self, path: Path) -> None:
        """Put back the actor's weights of the checkpoint at `path` (KL roll-back, the guard's choice),
        in place; every process calls it (under fsdp each loads its own shards, from a checkpoint of
        any number of processes). The optimiser and the critic stay as they are."""
        with checkpoint.readable(path):
            if self.fsdp:
                sharding.load_models(Path(path) / checkpoint.SHARDS, {"actor": (self.actor, None)})
            else:
                checkpoint.load_weights(path, {"actor": self.acc.unwrap_model(self.actor)})

    def _kl_ran_away(self, kl: float) -> bool:
        """Record this step's sequence KL; True (and `stopped_early` set) when the mean over the last
        `kl_stop_window` steps exceeds `kl_stop` x the adaptive controller's target."""
        pc = self.pc
        if not (pc.adaptive_kl and pc.kl_stop > 0 and pc.kl_stop_window > 0):
            return False
        self.recent_kl = (self.recent_kl + [kl])[-pc.kl_stop_window:]
        mean = sum(self.recent_kl) / len(self.recent_kl)
        if len(self.recent_kl) < pc.kl_stop_window or mean <= pc.kl_stop * pc.kl_target:
            return False
        self.stopped_early = {"step": self.step_idx, "mean_kl": mean, "reason": (
            f"sequence KL {mean:.2f} nats over the last {pc.kl_stop_window} steps > ppo.kl_stop={pc.kl_stop:g} x "
            f"ppo.kl_target={pc.kl_target:g} (the policy is running away from the base; see ppo.kl_stop)")}
        return True

    def _roll_back(self) -> None:
        """After a KL runaway, put back the actor of the newest checkpoint saved before the window
        that tripped the stop (its own window had passed the check); the critic is not needed for
        the policy. Without one (ppo.save_every too large, or too early), keep the last step's."""
        limit = self.step_idx - self.pc.kl_stop_window
        before = [p for p in checkpoint.completed(self.out / "checkpoints") if checkpoint.step_of(p) <= limit]
        if not before:
            self.stopped_early["rolled_back_to"] = None
            self.stopped_early["reason"] += f"; no checkpoint from step {limit} or earlier, so the policy is step " \
                                            f"{self.step_idx}'s"
            return
        self.load_actor(before[-1])
        step = checkpoint.step_of(before[-1])
        self.stopped_early["rolled_back_to"] = step
        self.stopped_early["reason"] += f"; the policy is step {step}'s, the newest checkpoint before the runaway"

    def _log_samples(self, fh, bar, k: int = 3) -> None:
        import json

        s = self.last_samples
        for p, t in list(zip(s.prompts, s.texts))[:k]:
            fh.write(json.dumps({"step": self.step_idx, "prompt": p, "response": t}) + "\n")
        fh.flush()
        if self.progress:
            p, t = s.prompts[0], s.texts[0]
            bar.write(f"[step {self.step_idx}] {p.strip()[-80:]!r} -> {t.strip()[:100]!r}", file=sys.stderr)

    def save_policy(self, out: Path, info: dict[str, Any]) -> Path | None:
        from .common import save_model_folder

        # under fsdp every process takes part in gathering the whole actor, onto the main process
        actor = sharding.unsharded(self.actor) if self.fsdp else self.acc.unwrap_model(self.actor)
        if not self.acc.is_main_process:
            return None
        if self.acc.num_processes > 1:
            info = {**info, "processes": self.acc.num_processes, "strategy": self.cfg.model.strategy}
        return save_model_folder(out, merged_policy(actor).eval(), self.tokenizer, info)


def assemble(tokenizer, prompts: list[str], responses: list[list[int]], device: torch.device | str = "cpu"):
    """(sequences, attention mask, position ids, response mask): [left-padded prompt | right-padded
    response], with the prompt laid out as generation laid it out (`chat_format.prompt_ids`: BOS
    where the tokenizer adds one) and explicit positions, so that the log-probs computed on these
    rows are the ones generation recorded. Sizes (B, P+R) x 3 and (B, R)."""
    prompt, prompt_mask = left_pad(prompt_ids(tokenizer, prompts), tokenizer.pad_token_id)
    R = max(1, max(len(r) for r in responses))
    resp = torch.full((len(responses), R), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(responses), R)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1.0
    seq = torch.cat([prompt, resp], 1).to(device)
    attn = torch.cat([prompt_mask.float(), mask], 1).to(device)
    pos = (attn.cumsum(1) - 1).clamp(min=0).long()
    return seq, attn.long(), pos, mask.to(device)
