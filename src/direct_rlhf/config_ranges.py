"""The values each numeric config key may take, checked once when a config is loaded.

Types are checked while the recipe is read (config.py); this is the second half of "validated at
the edge": a zero where a count belongs or a negative learning rate stops the run before any
work, with the key named, instead of surfacing later as a traceback (`log_every=0` was a division
by zero) or as a run that silently learns nothing (`grad_clip=0` scales every gradient to zero).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import UserError

# (low, high, low_open, high_open): None = unbounded; *_open excludes that end.
COUNT = (1, None, False, False)          # a size or count: 1 or more
NON_NEGATIVE = (0, None, False, False)
POSITIVE = (0, None, True, False)
UNIT = (0, 1, False, False)              # a fraction or probability in [0, 1]
OPEN_UNIT_RIGHT_CLOSED = (0, 1, True, False)

_LORA = {"r": COUNT, "alpha": POSITIVE, "dropout": (0, 1, False, True)}

SEED = (0, 2 ** 32 - 1, False, False)     # what numpy's generator accepts

RANGES: dict[str, tuple] = {
    "threads": COUNT, "seed": SEED, "world.seed": SEED,
    **{f"world.{k}": COUNT for k in ("fact_templates_per_fact", "n_dialogues", "n_pairs", "n_ppo_prompts",
                                     "n_mc_per_task", "n_redteam", "n_conversation")},
    "world.toxic_rate_when_provoked": UNIT, "world.toxic_rate_when_benign": UNIT,
    **{f"model.{k}": COUNT for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                     "intermediate_size", "max_position")},
    **{f"pretrain.{k}": COUNT for k in ("steps", "batch_size", "seq_len", "log_every")},
    "pretrain.lr": POSITIVE, "pretrain.min_lr_ratio": UNIT, "pretrain.warmup_steps": NON_NEGATIVE,
    "pretrain.weight_decay": NON_NEGATIVE, "pretrain.grad_clip": POSITIVE,
    **{f"reward.{k}": COUNT for k in ("epochs", "batch_size", "max_len", "eval_every", "log_every")},
    "reward.eval_fraction": (0, 1, True, True), "reward.lr": POSITIVE, "reward.weight_decay": NON_NEGATIVE,
    "reward.warmup_steps": NON_NEGATIVE, "reward.center_coef": NON_NEGATIVE, "reward.min_lr_ratio": UNIT,
    "reward.grad_clip": POSITIVE, "reward.stats_pairs": NON_NEGATIVE, "reward.micro_batch_size": NON_NEGATIVE,
    "reward.save_every": NON_NEGATIVE,
    **{f"sft.{k}": COUNT for k in ("epochs", "batch_size", "max_len", "log_every")},
    "sft.lr": POSITIVE, "sft.warmup_steps": NON_NEGATIVE, "sft.micro_batch_size": NON_NEGATIVE,
    **{f"ppo.{k}": COUNT for k in ("rollout_batch_size", "mini_batch_size", "micro_batch_size", "ppo_epochs",
                                   "max_new_tokens", "max_prompt_len", "kl_horizon", "ptx_batch_size", "save_every",
                                   "sample_every")},
    "ppo.steps": NON_NEGATIVE, "ppo.temperature": POSITIVE, "ppo.top_p": OPEN_UNIT_RIGHT_CLOSED,
    "ppo.actor_lr": POSITIVE, "ppo.critic_lr": POSITIVE, "ppo.weight_decay": NON_NEGATIVE,
    "ppo.grad_clip": POSITIVE, "ppo.kl_coef": NON_NEGATIVE, "ppo.kl_target": POSITIVE,
    "ppo.kl_stop": NON_NEGATIVE, "ppo.kl_stop_window": NON_NEGATIVE, "ppo.gamma": UNIT, "ppo.lam": UNIT,
    "ppo.clip_eps": POSITIVE, "ppo.value_clip_eps": POSITIVE, "ppo.vf_coef": NON_NEGATIVE,
    "ppo.reward_clip": POSITIVE, "ppo.ptx_coef": NON_NEGATIVE, "ppo.lambda_init": NON_NEGATIVE,
    "ppo.lambda_lr": NON_NEGATIVE, "ppo.vllm_gpu_memory_utilization": OPEN_UNIT_RIGHT_CLOSED,
    "ppo.micro_batch_tokens": NON_NEGATIVE,
    **{f"eval.{k}": COUNT for k in ("general_limit", "batch_size", "generation_batch_size", "samples_per_prompt",
                                    "conversation_samples", "max_new_tokens", "max_prompt_len")},
    "eval.temperature": POSITIVE, "eval.top_p": OPEN_UNIT_RIGHT_CLOSED, "eval.toxicity_threshold": UNIT,
    "eval.tie_eps": NON_NEGATIVE, "eval.bootstrap": COUNT, "eval.transcripts": NON_NEGATIVE,
    "eval.judge_timeout_s": POSITIVE,
    **{f"{s}.{k}": rule for s in ("reward.lora", "sft.lora", "ppo.lora", "ppo.critic_lora")
       for k, rule in _LORA.items()},
}


def check_ranges(cfg: Any, src: str) -> None:
    """Raise `UserError` naming the first key whose value is out of its range (None = unset, allowed)."""
    for key, value in _numbers(cfg, ""):
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
            raise UserError(f"{src}: config key '{key}' must be a finite number, got {value!r}")
        rule = RANGES.get(key)
        if rule is None or value is None:
            continue
        low, high, low_open, high_open = rule
        if ((low is not None and (value <= low if low_open else value < low))
                or (high is not None and (value >= high if high_open else value > high))):
            raise UserError(f"{src}: config key '{key}' must be {_describe(rule)}, got {value!r}")
    m = cfg.model
    if m.base is None and (m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads):
        raise UserError(f"{src}: config keys 'model.hidden_size' ({m.hidden_size}), 'model.num_heads' "
                        f"({m.num_heads}) and 'model.num_kv_heads' ({m.num_kv_heads}): the heads must divide "
                        f"the hidden size and the key-value heads the heads")


def _numbers(obj: Any, prefix: str):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            yield prefix + f.name, value


def _describe(rule: tuple) -> str:
    low, high, low_open, high_open = rule
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
