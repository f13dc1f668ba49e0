"""The four roles of PPO from a base model: actor, reference, reward, critic.

- actor:     the base model itself (full fine-tuning, or LoRA adapters through peft);
- reference: the frozen base. With LoRA it is the *same* weights with adapters disabled, so no
             second copy is held in memory; with full fine-tuning it is a frozen copy;
- reward:    the trained reward model, used through `RewardScorer` (text in, normalised score out);
- critic:    a per-token value head on a transformer, initialised from the reward model: the
             reward model already knows what a good response looks like, which gives the value
             function a head start that a randomly initialised head on the base model lacks.
             Fully trained, or (ppo.critic_lora) LoRA adapters on its transformer and a fully
             trained head, so that a large critic needs no optimiser state for its backbone; the
             reward model is then that critic with its adapters disabled and its head as loaded
             (`SharedRewardModel`), held once, as the reference shares the actor's weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch
from torch import nn
from ..config import LoraConfig
from ..models.dropout import disable_dropout
from ..models.loading import activation_checkpointing, load_causal_lm
from ..models.precision import float32_head, merge_in_float32, trained_dtype
from ..models.lora import add_lora
from ..models.reward_model import load_reward_model


class ValueModel(nn.Module):
    """Backbone + scalar head applied at every position: values of size (B, T)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, reward_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.reward_head = reward_head  # with LoRA: the head as loaded, frozen (see SharedRewardModel)

    @classmethod
    def from_reward_model(cls, path: str | Path, dtype: str = "float32", lora: LoraConfig | None = None,
                          trust_remote_code: bool = False, gradient_checkpointing: bool = False) -> "ValueModel":
        """The critic, initialised from a reward model folder: fully trained in float32, or LoRA on
        its transformer in `dtype`; the head float32 either way (models/precision.py)."""
        with_lora = lora is not None and lora.enabled
        rm = load_reward_model(path, trained_dtype(dtype, with_lora), trust_remote_code)
        backbone, score = getattr(rm, rm.base_model_prefix), rm.score
        if gradient_checkpointing:
            activation_checkpointing(backbone)
        if not isinstance(score, nn.Linear) or score.out_features != 1:
            raise TypeError(f"{path}: the reward model's head is a {type(score).__name__}, not a one-output linear layer")
        # a float32 head with a bias (Llama's score layer has none), so that the normalisation can be
        # folded into it in place (`start_on_normalised_scale`)
        head = nn.Linear(score.in_features, 1, bias=True, device=score.weight.device, dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(score.weight.float())
            head.bias.copy_(score.bias.float() if score.bias is not None else torch.zeros(1))
        head = float32_head(head)
        if not with_lora:
            return disable_dropout(cls(backbone, head))
        return disable_dropout(cls(add_lora(backbone, lora, "FEATURE_EXTRACTION"), head,
                                   float32_head(score).requires_grad_(False)))

    @torch.no_grad()
    def start_on_normalised_scale(self, mean: float, std: float) -> None:
        """Fold PPO's reward normalisation into the head, in place: the critic then predicts
        (raw - mean) / std, the scale of the returns it is trained on (PPO's score is normalised),
        from its first step. Left raw, a critic that predicts 6 for a target of 2 is closed only
        slowly by value clipping, and GAE's advantages meanwhile carry a bias that depends on the
        position. OpenRLHF normalises its critic's targets the same way. Call before the first update."""
        std = max(std, 1e-6)
        self.head.weight.div_(std)
        self.head.bias.sub_(mean).div_(std)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **kwargs).last_hidden_state  # size = (B, T, H)
        # a tensor of its own (one copy, whatever the head's dtype), not a view of the head's output:
        # FSDP2 warns (wrong gradients after an in-place op on it) when a sharded module returns a view
        return self.head(hidden).squeeze(-1).to(torch.float32, copy=True)  # size = (B, T)


class SharedRewardModel:
    """The reward model inside a LoRA critic: the critic's transformer with its adapters disabled
    and the frozen copy of the head it was loaded with. Called like the saved reward model
    (`.logits` of size (B, 1), read at the last token of right-padded rows), and scores the same.
    Not an nn.Module, so nothing done to it (`.eval()`, `.to()`) reaches the critic it reads."""

    def __init__(self, critic: ValueModel):
        if critic.reward_head is None:
            raise ValueError("only a critic with LoRA adapters contains its reward model unchanged")
        self._critic = critic
        self.config = critic.backbone.config

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        critic = self._critic
        with critic.backbone.disable_adapter():
            hidden = critic.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1) - 1  # size = (B,), right padding
        return SimpleNamespace(logits=critic.reward_head(hidden[torch.arange(len(last)), last]))  # size = (B, 1)


def load_actor(base: str, dtype: str, lora: LoraConfig, trust_remote_code: bool = False,
               gradient_checkpointing: bool = False) -> nn.Module:
    """The trained policy (PPO's actor, SFT's model): fully trained in float32, or LoRA adapters
    (float32) on the base in `dtype` (models/precision.py); dropout off (models/dropout.py)."""
    model = load_causal_lm(base, trained_dtype(dtype, lora.enabled), trust_remote_code)
    if gradient_checkpointing:
        activation_checkpointing(model)
    if lora.enabled:
        model = add_lora(model, lora, "CAUSAL_LM")
    return disable_dropout(model).train()


def load_reference(base: str, dtype: str, lora: LoraConfig, trust_remote_code: bool = False) -> nn.Module | None:
    """A frozen copy of the base for full fine-tuning; None with LoRA (see `reference_mode`)."""
    if lora.enabled:
        return None
    ref = load_causal_lm(base, dtype, trust_remote_code)
    ref.requires_grad_(False)
    return disable_dropout(ref).eval()


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
    place* (no second copy of a large model), so call it only when training is over. The merge
    runs in float32 and the policy is saved in float32 (models/precision.py)."""
    return merge_in_float32(actor)
