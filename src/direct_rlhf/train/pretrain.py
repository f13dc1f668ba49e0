"""Pretrain the toy world's base model: tokenizer + tiny Mistral, next-token loss on the corpus.

This produces the *base* model that direct RLHF starts from. It must know the world's facts (so
that keeping general capabilities can be measured) and it must have picked up the corpus's rude
habits (so that harmlessness can be seen to improve).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..errors import UserError
from ..io import read_jsonl
from ..models.factory import tiny_mistral
from ..models.tokenizer import train_tokenizer
from ..tracking import MetricsLogger, seed_everything
from .common import adamw, cosine_schedule, save_model_folder


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents (each closed by EOS) and cut into blocks: size = (N, seq_len)."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"corpus too small: {len(ids)} tokens for one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pretrain(cfg: Config, corpus_path: Path, out: Path, log_dir: Path, key: str, progress: bool = True) -> Path:
    seed_everything(cfg.seed)
    pc = cfg.pretrain
    texts = [row["text"] for row in read_jsonl(corpus_path, required=("text",))]
    if not texts:
        raise UserError(f"{corpus_path}: empty corpus")
    tokenizer = train_tokenizer(texts, cfg.model.vocab_size)
    blocks = pack(tokenizer, texts, pc.seq_len)  # size = (N, T)
    model = tiny_mistral(cfg.model, tokenizer, cfg.seed).train()
    opt = adamw(model, pc.lr, pc.weight_decay)
    sched = cosine_schedule(opt, pc.warmup_steps, pc.steps, pc.min_lr_ratio)
    gen = torch.Generator().manual_seed(cfg.seed)
    logger = MetricsLogger(log_dir)
    n_params = sum(p.numel() for p in model.parameters())
    start, tokens, last = time.perf_counter(), 0, math.nan
    bar = tqdm(range(1, pc.steps + 1), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = blocks[torch.randint(len(blocks), (pc.batch_size,), generator=gen)]  # size = (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip)
        opt.step()
        sched.step()
        tokens += batch.numel()
        last = loss.item()
        if step % pc.log_every == 0 or step == pc.steps:
            elapsed = time.perf_counter() - start
            logger.log(step, {"loss": last, "lr": sched.get_last_lr()[0], "tokens_per_s": tokens / elapsed,
                              "elapsed_s": elapsed})
            bar.set_postfix(loss=f"{last:.3f}")
    logger.close()
    info = {"stage": "pretrain", "key": key, "seed": cfg.seed, "config": cfg.section_dict("model", "pretrain"),
            "n_params": n_params, "n_blocks": len(blocks), "final_loss": last,
            "wall_s": time.perf_counter() - start}
    return save_model_folder(out, model.eval(), tokenizer, info)
