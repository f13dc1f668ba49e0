"""Small pieces every trainer shares: optimiser, schedule, saving a model folder atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..io import atomic_dir
from ..tracking import versions


def on_cpu() -> bool:
    """Whether accelerate should run on the CPU: no GPU, or `accelerate launch --cpu` on a machine
    with one. Every Accelerator and PartialState must be told the same, or accelerate refuses."""
    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def refuse_sharding() -> None:
    """A one-line error under `accelerate launch` with DeepSpeed or FSDP, before accelerate fails
    with a traceback or trains wrongly. PPO prepares two trained models (actor and critic) in one
    Accelerator, which accelerate refuses under DeepSpeed and FSDP2; under DeepSpeed its backward
    would also step the optimiser after every micro-batch; and sampling, checkpoints and the merged
    rollout copy read whole parameters, which sharding splits."""
    from ..errors import UserError

    for flag, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if parse_flag_from_env(flag):
            raise UserError(f"ppo: {name} is not supported (PPO trains two models in one Accelerator and reads "
                            "whole parameters to sample and save); launch without it: data parallel, with LoRA "
                            "(ppo.lora, ppo.critic_lora) for large models")


def training_device() -> torch.device:
    """Where a single-process trainer (reward model, SFT) runs: the GPU where there is one."""
    return torch.device("cpu" if on_cpu() else "cuda")


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases), as in GPT-style training."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)


def cosine_schedule(opt: torch.optim.Optimizer, warmup: int, total: int, min_lr_ratio: float):
    return get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=min(warmup, total),
                                                       num_training_steps=total, min_lr_rate=min_lr_ratio)


def save_model_folder(out: str | Path, model, tokenizer, info: dict[str, Any], extra: dict[str, Any] | None = None):
    """Write model + tokenizer + run info into `out`, atomically (the folder appears complete or not at all).

    `extra` maps file names to JSON-able objects written beside the weights.
    """
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "run_info.json").write_text(json.dumps({**info, "versions": versions()}, indent=2, default=str))
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str))
        from ..artifacts import stamp

        if "key" in info:
            stamp(tmp, info["key"], stage=info.get("stage"))
    return Path(out)
