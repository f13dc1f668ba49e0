"""How a trained model is spread over processes: the one place that knows the strategy.

`model.strategy`:

- `ddp`: every process holds the whole model, optimiser and gradients; torch's
  DistributedDataParallel averages the gradients over the processes once per optimiser step
  (in the last micro-batch's backward).
- `fsdp`: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer, then the
  root, is sharded over the processes, so parameters, gradients and optimiser state are split
  between them; a layer's parameters are gathered only while it runs. With `model.dtype:
  bfloat16` the layers compute in bf16 from fp32 master weights, gradients reduced in fp32;
  `model.fsdp_cpu_offload` keeps the shards (and the optimiser step) on the CPU.

Checkpoints are `torch.distributed.checkpoint` (DCP) folders of model + optimiser state, each
process writing its own shards; a checkpoint loads into any number of processes (resharded). The
finished model is gathered whole on the main process and written as one Hugging Face folder.

Both strategies run on the CPU over gloo (`torchrun --nproc_per_node 2`), so CI tests them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from ..errors import UserError

STRATEGIES = ("ddp", "fsdp")


# --- processes -------------------------------------------------------------------------------------

def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def init_processes(timeout_min: float | None = None) -> torch.device:
    """Join the other processes when started by torchrun / accelerate launch (WORLD_SIZE > 1), over
    gloo on the CPU and NCCL on GPUs (accelerate's PartialState picks, as PPO's Accelerator does);
    returns this process's device. A single process starts no process group. `timeout_min`
    (model.process_timeout_min): how long a collective waits for the other processes; it takes
    effect in the first call of a process (the group is made once), so every trainer calls this
    before building its Accelerator."""
    from .common import on_cpu, training_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return training_device()
    from datetime import timedelta

    from accelerate import PartialState

    kwargs = {} if timeout_min is None else {"timeout": timedelta(minutes=timeout_min)}
    return PartialState(cpu=on_cpu(), **kwargs).device


def close_processes() -> None:
    """Leave the process group once a command has finished cleanly. Left to the interpreter's exit,
    gloo's worker threads can outlive it and abort the process ('terminate called without an active
    exception', SIGABRT; pytorch#190489), which torchrun then reports as a failed run. Not after an
    error: the other processes may be inside a collective, and torchrun stops them anyway."""
    if dist.is_available() and dist.is_initialized():
        barrier()  # every earlier collective done, the GIL free while waiting for the others
        dist.destroy_process_group()


def split_batch(global_batch: int, what: str) -> int:
    """Rows per process for a global batch of `global_batch` rows; a one-line error if it does not divide."""
    n = world_size()
    if global_batch % n:
        raise UserError(f"{what}={global_batch} is the global batch: it must divide by the number of processes ({n})")
    return global_batch // n


def most(n: int) -> int:
    """The largest `n` over the processes (`n` itself when there is one)."""
    if world_size() == 1:
        return n
    x = torch.tensor([n], dtype=torch.long)
    if dist.get_backend() == "nccl":
        x = x.cuda()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the processes (a new tensor; `x` itself when there is one process)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# --- the model ---------------------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer's stack of decoder layers, found generically: the largest ModuleList of
    identical blocks (Llama/Mistral/Qwen `model.model.layers`, GPT-2 `transformer.h`, ...)."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise UserError(f"model.strategy=fsdp: no stack of decoder layers found in {type(model).__name__}")
    return best


def shard(model: nn.Module, strategy: str, dtype: str = "float32", cpu_offload: bool = False,
          device: torch.device | None = None, frozen: bool = False,
          float32: Sequence[nn.Module] = ()) -> nn.Module:
    """Spread `model` (already on `device`) over the processes for training under `strategy`;
    build the optimiser after this call (FSDP replaces the parameters by their shards).
    `ddp` wraps it in torch's DistributedDataParallel when there are several processes (as it is
    for one). `frozen`: a model that is only read (PPO's reference), sharded to hold 1/N of its
    weights per process. `float32`: modules that compute in float32 whatever `dtype` (a head made
    by models/precision.py's `float32_head`, which casts its input to float32): under bf16 compute
    each is sharded on its own with float32 parameters, as the root's would be gathered in bf16."""
    if strategy not in STRATEGIES:
        raise UserError(f"model.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "ddp":
        if world_size() == 1 or frozen:
            return model
        device = device or next(model.parameters()).device
        # no buffer broadcast: a forward then runs no collective, so processes may run unequal numbers of
        # micro-batches (their gradients are reduced in the last one's backward). torch 2.13 renamed the
        # switch (the new one still syncs buffers once, at wrapping: the same weights everywhere anyway)
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers")
        return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not frozen and any(not p.requires_grad for p in model.parameters()):
        raise UserError("model.strategy=fsdp trains every parameter (full fine-tuning): turn LoRA off")
    device = device or next(model.parameters()).device
    if not dist.is_initialized():  # one process: a group of one, so the same code runs everywhere
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(device.type, (world_size(),))
    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    kw: dict[str, Any] = {
        "mesh": mesh,
        # fp32 master weights and gradient reduction; the layers run in bf16 when the config asks for it
        "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None),
        # pinned host memory needs an accelerator: an all-CPU run offloads to plain memory
        "offload_policy": CPUOffloadPolicy(pin_memory=device.type != "cpu") if cpu_offload else OffloadPolicy(),
    }
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    for module in float32 if compute else ():
        fully_shard(module, **{**kw, "mp_policy": MixedPrecisionPolicy()})
    fully_shard(model, **kw)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole_weights(model: nn.Module) -> Iterator[nn.Module]:
    """A sharded model with every parameter gathered (unshard) for the block, then resharded: its
    forward passes inside run no collective, so the processes may run different numbers of them
    (generation, each process stopping when its own rows end). Holds the whole model's weights
    (in compute dtype) for the block. An unsharded model is yielded as it is."""
    if not is_sharded(model):
        yield model
        return
    mods = fsdp_modules(model)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP2's defaults: the root keeps its own


def gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce the gradients in the next forward + backward pass (the last micro-batch) or keep them
    local, unreduced, to accumulate (the ones before); call it before the forward pass: DDP decides
    there (what its `no_sync()` context sets), FSDP2 at the backward."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm`; works on whole and on sharded (DTensor)
    gradients (the norm is then reduced over the processes). Returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# --- exporting and checkpoints ----------------------------------------------------------------------

def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process (on the CPU), empty on the others: every
    process must call it (FSDP gathers the shards). An unsharded model's own state dict, as is."""
    if not is_sharded(model):
        return unwrapped(model).state_dict() if is_main() else {}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(model: nn.Module, part: str = "") -> nn.Module | None:
    """The trained model whole, as a plain module of its own class (no FSDP wrapping) on the main
    process, None on the others; every process must call it. An unsharded model is returned as is
    (on the main process). `part`: the trained model's name inside `model`, where the sharded root
    is a module around it (the reward trainer's loss)."""
    if not is_sharded(model):
        return unwrapped(model).get_submodule(part) if is_main() else None
    from torch.distributed.fsdp import FSDPModule

    state = full_state_dict(model)
    if not is_main():
        return None
    inner, prefix = model.get_submodule(part), f"{part}." if part else ""
    cls = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))  # FSDP2 subclasses the model's class
    plain = cls(inner.config)  # built on the CPU: non-persistent buffers (rotary tables) made as from_pretrained does
    plain.load_state_dict({name.removeprefix(prefix): w for name, w in state.items() if name.startswith(prefix)})
    return plain


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, extra: dict[str, Any] | None) -> Path:
    """Write model + optimiser state as a DCP checkpoint at `path`, atomically: every process
    writes its shards into a temporary folder that the main process renames into place once all
    are done (a killed run leaves the old checkpoint or the new one). `extra` (step, schedule,
    data order: the same on every process) is written by the main process beside them."""
    return save_models(path, {"": (model, opt)}, extra)


def _state(models: dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]) -> dict[str, Any]:
    """DCP's state of several (model, optimiser) pairs: {name: {model, optim}}, or the pair's own
    {model, optim} for the one unnamed pair (SFT's layout)."""
    state: dict[str, Any] = {}
    for name, (model, opt) in models.items():
        if opt is None:
            one = {"model": get_model_state_dict(model)}
        else:
            model_sd, optim_sd = get_state_dict(model, opt)
            one = {"model": model_sd, "optim": optim_sd}
        if not name:
            return one
        state[name] = one
    return state


def save_models(path: Path, models: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
                extra: dict[str, Any] | None) -> Path:
    """`save_checkpoint` for several models, each with its optimiser (PPO's actor and critic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_state(models), checkpoint_id=str(tmp))
    if is_main() and extra is not None:
        torch.save(extra, tmp / "trainer.pt")
    barrier()
    if is_main():
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    barrier()
    return path


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a `save_checkpoint` folder into `model` and `opt` in place, resharded to this run's
    processes (a 2-process checkpoint resumes on 1 process and the other way round); returns `extra`."""
    path = Path(path)
    if not (path / "trainer.pt").is_file():
        raise UserError(f"{path}: not a complete checkpoint")
    load_models(path, {"": (model, opt)})
    return torch.load(path / "trainer.pt", weights_only=True)


def load_models(path: Path, models: dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]) -> None:
    """Load a `save_models` folder into the named models (and optimisers; None: the weights only),
    in place, resharded to this run's processes; the folder may hold more models than asked for."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise UserError(f"{path}: not a complete checkpoint")
    state = _state(models)
    dcp.load(state, checkpoint_id=str(path))
    for name, (model, opt) in models.items():
        one = state[name] if name else state
        if opt is None:
            set_model_state_dict(model, one["model"])
        else:
            set_state_dict(model, opt, model_state_dict=one["model"], optim_state_dict=one["optim"])
