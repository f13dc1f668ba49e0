"""The policy's current weights under plain Hugging Face names, LoRA deltas added, for a rollout
engine that is not the actor itself: vLLM (`vllm_generate`) or a plain copy of the model
(`MergedRolloutCopy`)."""

from __future__ import annotations

from typing import Iterator

import torch

from ..models.loading import load_causal_lm


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter whole: an FSDP2 shard (DTensor) is gathered from every process (a collective:
    every process must ask for the same parameters in the same order). A shard kept on the CPU
    (model.fsdp_cpu_offload) is moved to its mesh's device first, as torch's own full state dict
    does: NCCL gathers GPU tensors only."""
    p = p.detach()
    if not hasattr(p, "full_tensor"):
        return p
    if p.device.type != p.device_mesh.device_type:
        p = p.to(p.device_mesh.device_type)
    return p.full_tensor()


def actor_weights(actor: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The actor's weights under plain Hugging Face names, one at a time, each LoRA delta added on
    the fly; a sharded (model.strategy=fsdp) actor's gathered whole, one parameter at a time. The
    actor is not touched: merging in place and unmerging after would leave rounding error in the
    frozen base weights at every step, and they are also PPO's KL reference."""
    if not hasattr(actor, "get_base_model"):
        for name, p in actor.named_parameters():
            yield name, _whole(p)
        return
    base = actor.get_base_model()
    modules = dict(base.named_modules())
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and leaf == "weight":
            layer = modules[owner.removesuffix(".base_layer")]
            w = p.detach()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:  # added in float32: in bf16 a small delta rounds away
                    w = w.float() + layer.get_delta_weight(adapter).float()
            yield owner.removesuffix(".base_layer") + ".weight", w
        else:
            yield name.replace(".base_layer", ""), p.detach()


class MergedRolloutCopy:
    """A plain causal LM that samples for a LoRA actor (`ppo.merged_rollout`). Before each rollout
    its weights are set to the actor's, adapters added (`actor_weights`): a decoded token then costs
    one matrix product per projection instead of peft's three plus its small element-wise ops. On
    the toy model that makes generation 10–25% faster (docs/performance.md); it holds one more copy
    of the model's weights, which is why large-model recipes leave it off. The balance guard's plain
    copy of a sharded actor is one too (train/balance_guard.py)."""

    def __init__(self, base: str, trust_remote_code: bool = False, dtype: str = "float32"):
        # float32 by default, whatever model.dtype is: the adapters' deltas are too small for bf16
        # weights (models/precision.py); under ppo.bf16 generation still computes in bf16
        self.model = load_causal_lm(base, dtype, trust_remote_code).requires_grad_(False)
        self._params = dict(self.model.named_parameters())

    def sync(self, actor: torch.nn.Module) -> torch.nn.Module:
        """The copy, holding the actor's current weights."""
        with torch.no_grad():
            for name, w in actor_weights(actor):
                self._params[name].copy_(w)
        return self.model
