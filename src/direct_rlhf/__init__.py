"""direct-rlhf: RLHF applied directly to a pretrained base model, skipping SFT (arXiv 2403.02513)."""

__version__ = "0.1.0"
