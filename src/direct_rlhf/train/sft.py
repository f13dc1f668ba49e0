"""The conventional pipeline's first stage, kept only as the baseline direct RLHF is compared to:
supervised fine-tuning of the base model on the *chosen* responses of the preference data.

The loss covers the final assistant response (and the EOS that ends it) only: the prompt's
tokens, earlier turns included, are context, not targets.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.chat_format import special_wrapping
from ..data.preferences import Pair
from ..models.loading import load_tokenizer
from ..tracking import MetricsLogger, seed_everything
from .common import cosine_schedule, save_model_folder, training_device
from .ppo_models import load_actor, merged_policy

IGNORE = -100


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


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], attn[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, attn, labels  # size = (B, T) each


def train_sft(cfg: Config, base: str, pairs: list[Pair], out: Path, log_dir: Path, key: str,
              progress: bool = True, load: dict | None = None) -> Path:
    """`load`: how the pairs were read (rows, records skipped as invalid, ...), for run_info.json."""
    sc = cfg.sft
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
    model = load_actor(base, cfg.model.dtype, sc.lora, cfg.model.trust_remote_code, cfg.model.gradient_checkpointing)
    device = training_device()
    model.to(device)
    examples = [sft_example(tokenizer, p.prompt, p.chosen, sc.max_len) for p in pairs]
    steps = max(1, sc.epochs * len(examples) // sc.batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sc.lr)
    sched = cosine_schedule(opt, sc.warmup_steps, steps, 0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    logger = MetricsLogger(log_dir)
    order: list[int] = []
    start = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc="sft", disable=not progress, dynamic_ncols=True):
        if len(order) < sc.batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch, order = order[:sc.batch_size], order[sc.batch_size:]
        ids, attn, labels = (t.to(device) for t in collate([examples[i] for i in batch], tokenizer.pad_token_id))
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % sc.log_every == 0 or step == steps:
            logger.log(step, {"loss": loss.item(), "lr": sched.get_last_lr()[0]})
    logger.close()
    info = {"stage": "sft", "key": key, "seed": cfg.seed, "init": base, "data_load": load, "n_examples": len(examples),
            "steps": steps, "config": cfg.section_dict("sft"), "wall_s": time.perf_counter() - start}
    return save_model_folder(out, merged_policy(model).eval(), tokenizer, info)
