"""The conventional pipeline's first stage, kept only as the baseline direct RLHF is compared to:
supervised fine-tuning of the base model on the *chosen* responses of the preference data.

The loss covers the final assistant response (and the EOS that ends it) only: the prompt's
tokens, earlier turns included, are context, not targets.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.chat_format import special_wrapping
from ..data.preferences import Pair
from ..models.loading import load_tokenizer
from ..tracking import MetricsLogger, seed_everything
from . import sharding
from .common import cosine_schedule, save_model_folder
from .ppo_models import load_actor, merged_policy

IGNORE = -100
log = logging.getLogger("direct_rlhf")


def sft_example(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are IGNORE on the prompt; the prompt is cut from the left when long.
    The prompt starts with the tokenizer's leading special tokens (BOS), as in every role
    (`chat_format.special_wrapping`), and they are never cut."""
    head, _ = special_wrapping(tokenizer)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    r = r[:max(1, max_len - len(head))]
    room = max(0, max_len - len(head) - len(r))
    p = head + p[len(p) - room:] if room else head
    return p + r, [IGNORE] * len(p) + r


def _own_checkpoint(root: Path, key: str) -> Path | None:
    """The newest complete checkpoint under `root` made with inputs `key`; the others' are removed
    (by the main process; every process waits), or they would outlive this run's own."""
    done = sorted(p for p in root.glob("step-*") if (p / ".metadata").is_file() and (p / "trainer.pt").is_file())
    own = [p for p in done if torch.load(p / "trainer.pt", weights_only=True).get("key") == key]
    sharding.barrier()  # every process has read them before the main one removes any (a process still
    # reading a removed folder's trainer.pt crashed, and the others then failed at the next barrier)
    if sharding.is_main():
        for other in set(done) - set(own):
            shutil.rmtree(other, ignore_errors=True)
    sharding.barrier()
    return own[-1] if own else None


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], attn[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, attn, labels  # size = (B, T) each


def train_sft(cfg: Config, base: str, pairs: list[Pair], out: Path, log_dir: Path, key: str,
              progress: bool = True, load: dict | None = None, checkpoints: Path | None = None,
              save_every: int = 0, resume_from: Path | None = None) -> Path:
    """`load`: how the pairs were read (rows, records skipped as invalid, ...), for run_info.json.

    Data parallel over every process started by torchrun: `sft.batch_size` is the global batch,
    each process takes its share in `sft.micro_batch_size` passes and `model.strategy` (ddp or
    fsdp, train/sharding.py) spreads the model; the loss is the mean over the global batch's
    response tokens, so N processes compute the step one process would. `save_every` > 0 writes a
    sharded checkpoint `checkpoints/step-<N>` every that many steps (the newest two kept);
    `resume_from` continues one, on any number of processes; without it, the newest checkpoint
    under `checkpoints` made with the same `key` is continued (the others are removed)."""
    sc, mc = cfg.sft, cfg.model
    device = sharding.init_processes(cfg.model.process_timeout_min)
    n_proc, me = sharding.world_size(), sharding.rank()
    share = sharding.split_batch(sc.batch_size, "sft.batch_size")
    micro = sc.micro_batch_size or share
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(base, mc.trust_remote_code)
    model = load_actor(base, mc.dtype, sc.lora, mc.trust_remote_code, mc.gradient_checkpointing)
    model.to(device)
    model = sharding.shard(model, mc.strategy, mc.dtype, mc.fsdp_cpu_offload, device)
    examples = [sft_example(tokenizer, p.prompt, p.chosen, sc.max_len) for p in pairs]
    targets = [sum(t != IGNORE for t in labels[1:]) for _, labels in examples]  # tokens the loss averages over
    steps = max(1, sc.epochs * len(examples) // sc.batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sc.lr)
    sched = cosine_schedule(opt, sc.warmup_steps, steps, 0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    first = 1
    if resume_from is None and checkpoints is not None:
        resume_from = _own_checkpoint(Path(checkpoints), key)
    if resume_from is not None:
        log.info("sft: resuming from %s", resume_from)
        state = sharding.load_checkpoint(resume_from, model, opt)
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        order, first = state["order"], state["step"] + 1
    main = sharding.is_main()
    logger = MetricsLogger(log_dir, resume_from=first - 1 if resume_from is not None else None) if main else None
    start = time.perf_counter()
    for step in tqdm(range(first, steps + 1), desc="sft", disable=not (progress and main), dynamic_ncols=True):
        if len(order) < sc.batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch, order = order[:sc.batch_size], order[sc.batch_size:]
        mine = batch[me * share:(me + 1) * share]
        chunks = [mine[i:i + micro] for i in range(0, share, micro)]
        opt.zero_grad(set_to_none=True)
        if n_proc == 1 and len(chunks) == 1 and not sharding.is_sharded(model):
            # one process, one pass: the loss is the batch's token mean as transformers computes it
            ids, attn, labels = (t.to(device) for t in collate([examples[i] for i in batch], tokenizer.pad_token_id))
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            shown = loss.detach()
        else:
            # each pass's summed token loss over the global batch's token count: the passes of all
            # processes add up to the one-pass mean (x n_proc: the gradient reduction averages)
            tokens = sharding.all_sum(torch.tensor(float(sum(targets[i] for i in mine)), device=device))
            shown = torch.zeros((), device=device)
            for k, chunk in enumerate(chunks):
                sharding.gradient_sync(model, k == len(chunks) - 1)
                rows = collate([examples[i] for i in chunk], tokenizer.pad_token_id)
                ids, attn, labels = (t.to(device) for t in rows)
                loss = model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=tokens).loss
                (loss * n_proc).backward()
                shown += loss.detach()
            shown = sharding.all_sum(shown)
        sharding.clip_grad_norm(model, 1.0)
        opt.step()
        sched.step()
        if main and (step % sc.log_every == 0 or step == steps):
            logger.log(step, {"loss": shown.item(), "lr": sched.get_last_lr()[0]})
        if checkpoints is not None and save_every > 0 and step % save_every == 0 and step < steps:
            sharding.save_checkpoint(Path(checkpoints) / f"step-{step:06d}", model, opt,
                                     {"step": step, "order": order, "gen": gen.get_state(),
                                      "sched": sched.state_dict(), "key": key})
            if main:  # the newest two: a 7B model's checkpoint is ~116 GB
                for old in sorted(Path(checkpoints).glob("step-*"))[:-2]:
                    shutil.rmtree(old, ignore_errors=True)
    if logger is not None:
        logger.close()
    info = {"stage": "sft", "key": key, "seed": cfg.seed, "init": base, "data_load": load, "n_examples": len(examples),
            "steps": steps, "config": cfg.section_dict("sft"), "wall_s": time.perf_counter() - start}
    if n_proc > 1:
        info["processes"] = n_proc
    whole = sharding.unsharded(model)  # every process takes part; the whole model on the main one only
    if main:
        save_model_folder(out, merged_policy(whole).eval(), tokenizer, info)
    sharding.barrier()
    return Path(out)
