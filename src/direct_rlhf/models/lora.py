"""LoRA adapters through peft, one way for every trained role (reward model, SFT, actor, critic)."""

from __future__ import annotations

import warnings

from torch import nn

from ..config import LoraConfig


def add_lora(model: nn.Module, lora: LoraConfig, task_type: str) -> nn.Module:
    """`model` with LoRA adapters on `lora.target_modules`, its own weights frozen. `task_type` is
    peft's ("CAUSAL_LM", "SEQ_CLS": the new score head stays fully trained, "FEATURE_EXTRACTION")."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias while it wraps a
        # model: a FutureWarning in every LoRA run that no user can act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                    target_modules=list(lora.target_modules), task_type=task_type))
