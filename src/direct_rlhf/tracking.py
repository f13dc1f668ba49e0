"""Metrics (JSONL + TensorBoard), run metadata and seeding: what every stage writes beside its outputs."""

from __future__ import annotations

import json
import platform
import random
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

PACKAGES = ("direct-rlhf", "torch", "transformers", "tokenizers", "peft", "accelerate", "datasets",
            "lm_eval", "alt-profanity-check")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def drop_rows_after(path: str | Path, step: int) -> None:
    """Keep only the rows of a step-logged JSONL file up to `step`: a run resumed from its step-N
    checkpoint logs steps N+1... again, which a run killed between checkpoints had logged once.
    A line cut short by the kill is dropped too (it was being written after the checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    from .io import atomic_file

    def logged_step(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except ValueError:
            return float("inf")

    kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip() and logged_step(line) <= step]
    with atomic_file(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def open_step_log(path: str | Path, resume_from: int | None):
    """A step-logged JSONL file opened for writing: anew, or, for a run resumed from its step-N
    checkpoint, after the rows past step N (`drop_rows_after`)."""
    if resume_from is not None:
        drop_rows_after(path, resume_from)
    return Path(path).open("w" if resume_from is None else "a", encoding="utf-8")


class MetricsLogger:
    """Append one JSON object per step to `metrics.jsonl`; mirror scalars to TensorBoard.

    `resume_from=N`: a run resumed from its step-N checkpoint keeps the rows up to step N and
    logs the later ones again, once (TensorBoard hides its own later events: `purge_step`)."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_from: int | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fh = open_step_log(self.dir / "metrics.jsonl", resume_from)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"),
                                     purge_step=None if resume_from is None else resume_from + 1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v
