"""Dropout off in every role, as TRL does for RLHF.

PPO compares log-probs of the same tokens from different forward passes (generation, the
experience pass, each epoch, the reference): dropout would make the ratio differ from 1 before any
update, and the reference log-probs and the critic's values noisy. A base model's config may set
dropout, and so may `lora.dropout`; both are turned off here, whatever the module's train/eval
mode (training mode is kept: gradient checkpointing needs it).
"""

from __future__ import annotations

from torch import nn

# attributes that attention and MLP implementations read as a rate at forward time
_RATE_ATTRIBUTES = ("attention_dropout", "dropout", "hidden_dropout", "activation_dropout", "attn_pdrop",
                    "resid_pdrop", "embd_pdrop", "dropout_rate")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout layer and dropout rate in `model` (and its configs) set to 0; returns `model`."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in _RATE_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
                    setattr(config, key, 0.0)
    return model
