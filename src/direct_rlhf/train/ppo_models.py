"""The four roles of PPO from a base model: actor, reference, reward, critic.

- actor:     the base model itself (full fine-tuning, or LoRA adapters through peft);
- reference: the frozen base. With LoRA it is the *same* weights with adapters disabled, so no
             second copy is held in memory; with full fine-tuning it is a frozen copy;
- reward:    the trained reward model, used through `RewardScorer` (text in, normalised score out);
- critic:    a per-token value head on a transformer, initialised from the reward model: the
             reward model already knows what a good response looks like, which gives the value
             function a head start that a randomly initialised head on the base model lacks.
             Fully trained, or (ppo.critic_lora) LoRA adapters on its transformer and a fully
             trained head, so that a large critic needs no optimiser state for its backbone.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from ..config import LoraConfig
from ..models.loading import DTYPES, load_causal_lm


class ValueModel(nn.Module):
    """Backbone + scalar head applied at every position: values of size (B, T)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_reward_model(cls, path: str | Path, dtype: str = "float32",
                          lora: LoraConfig | None = None) -> "ValueModel":
        rm = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=DTYPES[dtype],
                                                                use_safetensors=True)
        backbone = getattr(rm, rm.base_model_prefix)
        if lora is not None and lora.enabled:
            backbone = _with_lora(backbone, lora, "FEATURE_EXTRACTION")
        return cls(backbone, rm.score)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # size = (B, T, H)
        return self.head(hidden).squeeze(-1).float()  # size = (B, T)


def load_actor(base: str, dtype: str, lora: LoraConfig, trust_remote_code: bool = False,
               gradient_checkpointing: bool = False) -> nn.Module:
    model = load_causal_lm(base, dtype, trust_remote_code)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generation turns it back on per call
    if lora.enabled:
        model = _with_lora(model, lora, "CAUSAL_LM")
    return model.train()


def _with_lora(model: nn.Module, lora: LoraConfig, task_type: str) -> nn.Module:
    """peft LoRA adapters on `model`; its own weights frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=list(lora.target_modules), task_type=task_type))


def load_reference(base: str, dtype: str, lora: LoraConfig, trust_remote_code: bool = False) -> nn.Module | None:
    """A frozen copy of the base for full fine-tuning; None with LoRA (see `reference_mode`)."""
    if lora.enabled:
        return None
    ref = load_causal_lm(base, dtype, trust_remote_code)
    ref.requires_grad_(False)
    return ref.eval()


@contextlib.contextmanager
def reference_mode(actor: nn.Module, ref: nn.Module | None) -> Iterator[nn.Module]:
    """Yield the model that computes reference log-probs: the frozen copy, or the actor with
    its LoRA adapters switched off for the duration of the block."""
    if ref is not None:
        yield ref
        return
    with actor.disable_adapter():
        yield actor


def merged_policy(actor: nn.Module) -> nn.Module:
    """The policy as a plain causal LM for saving: LoRA adapters merged into the weights *in
    place* (no second copy of a large model), so call it only when training is over."""
    if hasattr(actor, "merge_and_unload"):
        return actor.merge_and_unload()
    return actor
