"""Trained parameters stay float32, whatever dtype the frozen weights load in (`model.dtype`).

bfloat16 keeps 8 bits of mantissa: an AdamW step of lr 1e-5 on a weight of 0.02 is below half a
bfloat16 step and rounds away, so a bf16 value head barely moves (15% of its weights in 100 steps,
measured), and a LoRA delta of std 1e-5 merged into bf16 weights is mostly lost (relative error
0.9). So: a fully trained model loads in float32; with LoRA the frozen base loads in `model.dtype`
and only the adapters (peft keeps them float32) and the heads are trained, in float32; merges
happen in float32 (`merge_in_float32`). Compute may still run in bf16 under autocast (ppo.bf16).
"""

from __future__ import annotations

import torch
from torch import nn


def trained_dtype(dtype: str, lora: bool) -> str:
    """The dtype a trained model loads in: `dtype` for the frozen base under LoRA, else float32."""
    return dtype if lora else "float32"


def float32_head(head: nn.Module) -> nn.Module:
    """A head kept in float32; its input (bf16 hidden states) is cast to match."""
    head.float()
    head.register_forward_pre_hook(lambda module, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    return head


def merge_in_float32(model: nn.Module) -> nn.Module:
    """LoRA adapters merged into float32 copies of the weights (no rounding of small updates);
    a model without adapters is returned as it is. The merged model is float32."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return model.float().merge_and_unload()
