"""Atomic, resumable training checkpoints.

A checkpoint is a folder `step-<N>` written next to its final place and renamed into it, so a
process killed at any instant leaves only complete checkpoints (and perhaps a stray temporary
folder, which is ignored and cleaned up). It holds the trainable weights (safetensors), the
optimiser/scheduler states, every RNG state (one file per process) and the trainer's own
state (step, KL controller, Lagrange multiplier) as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..artifacts import STAMP, stamp
from ..errors import UserError
from ..io import atomic_dir

KEEP = 2
SHARDS = "sharded"  # model.strategy=fsdp: the weights and optimiser states, a DCP folder written by every process


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters only (LoRA: the adapters), each an independent contiguous tensor."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """Every RNG a step draws from, as tensors and plain data (loadable with weights_only=True): on a
    GPU, sampling draws from the GPU's own generator (this process's device), so that one too."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


_TENSOR = "__tensor__"  # marks a tensor sent as a list (`gathered_rng_states`)


def gathered_rng_states(gather_objects) -> list[dict[str, Any]]:
    """Every process's `rng_state()`, by `gather_objects` (accelerate's object gather). The tensors
    travel as lists: unpickling a gathered tensor's storage fails in torch 2.13 (AttributeError:
    'UntypedStorage' has no attribute 'dtype'), and lists of numbers pickle anywhere."""
    return [_as_tensors(s) for s in gather_objects([_as_lists(rng_state())])]


def _as_lists(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (_TENSOR, str(x.dtype).removeprefix("torch."), x.cpu().tolist())
    if isinstance(x, dict):
        return {k: _as_lists(v) for k, v in x.items()}
    return tuple(_as_lists(v) for v in x) if isinstance(x, tuple) else x


def _as_tensors(x: Any) -> Any:
    if isinstance(x, tuple) and len(x) == 3 and x[0] == _TENSOR:
        return torch.tensor(x[2], dtype=getattr(torch, x[1]))
    if isinstance(x, dict):
        return {k: _as_tensors(v) for k, v in x.items()}
    return tuple(_as_tensors(v) for v in x) if isinstance(x, tuple) else x



def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a CPU run's checkpoint has none to restore
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, step: int, models: dict[str, torch.nn.Module], states: dict[str, Any],
         trainer_state: dict[str, Any], rank: int = 0, world_size: int = 1, shards: Path | None = None) -> Path:
    """Write `root/step-<step>` atomically (call on the main process; RNG states of all ranks
    are passed in `trainer_state['rng']` as a list). `shards`: a complete DCP folder (sharded
    weights and optimiser states, every process's) moved into it as `SHARDS`."""
    out = root / f"step-{step:06d}"
    with atomic_dir(out) as tmp:
        if shards is not None:
            os.replace(shards, tmp / SHARDS)
        for name, model in models.items():
            save_file(trainable_state(model), str(tmp / f"{name}.safetensors"))
        torch.save(states, tmp / "optim.pt")
        torch.save(trainer_state.pop("rng"), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        stamp(tmp, f"step-{step}", stage="ppo-checkpoint", world_size=world_size)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".step-*.tmp"):
        shutil.rmtree(stray, ignore_errors=True)
    return out


def clear(root: Path) -> None:
    """Remove every checkpoint under `root`: a run that starts afresh must not keep another run's,
    which would outlive its own (pruning keeps the highest steps) and be rolled back or resumed to."""
    for old in [*root.glob("step-*"), *root.glob(".step-*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)


def completed(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    return sorted(p for p in root.glob("step-*") if (p / STAMP).is_file())


def latest(root: Path) -> Path | None:
    done = completed(root)
    return done[-1] if done else None


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


@contextlib.contextmanager
def readable(path: Path) -> Iterator[None]:
    """A checkpoint whose files cannot be read back (cut short, edited, from another model) is
    one line naming it, for every trainer that resumes from one."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"{path}: damaged checkpoint ({err}); remove it to resume from the one before") from None


def trainer_state(path: Path) -> dict[str, Any]:
    with readable(path):
        return json.loads((path / "trainer_state.json").read_text())


def load(path: Path, models: dict[str, torch.nn.Module]) -> tuple[dict[str, Any], dict[str, Any], list]:
    """Load weights into `models` in place; returns (optimiser states, trainer state, rng states)."""
    with readable(path):
        load_weights(path, models)
        states = torch.load(path / "optim.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
    return states, trainer_state(path), rng


def load_weights(path: Path, models: dict[str, torch.nn.Module]) -> None:
    """Load the saved trainable weights of each named model into it, in place."""
    for name, model in models.items():
        weights = load_file(str(path / f"{name}.safetensors"))
        missing = set(weights) - {n for n, _ in model.named_parameters()}
        if missing:
            raise RuntimeError(f"{path}: checkpoint has weights the model lacks: {sorted(missing)[:3]}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
