"""Which of torch's fused attention kernels run on a GPU.

torch (2.11) prefers cuDNN's scaled-dot-product attention for bf16 on Hopper GPUs, and cuDNN builds
an execution plan for every new shape. Generation changes the key length with every token, and
PPO's micro-batches change their widths every time, so that plan is rebuilt all the time. Measured
on an H200 (bf16, hidden 512 x 6 layers, our PPO step alone, one run of 3 steps each, cuDNN's SDPA
switched off process-wide; docs/performance.md): 1.47 s a step without it, 1.90 s with it
(generation 0.37 vs 0.66 s, scoring 0.04 vs 0.17 s). The same attention, computed by other kernels.
"""

from __future__ import annotations

import contextlib

import torch


def without_cudnn_attention(device: torch.device | str):
    """A context in which SDPA on `device` uses flash, memory-efficient or math kernels, not cuDNN's;
    nothing changes off a GPU."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
