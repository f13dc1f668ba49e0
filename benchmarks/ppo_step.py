"""Median seconds per PPO step and peak memory at a fixed configuration.

Fixed config (the one issue #4 names, so numbers compare across commits and with peers): a tiny
Mistral built from config (hidden 128, 4 layers, vocab ~2k, toy tokenizer), a reward model with a
head on the same backbone, 32 prompts, 48 new tokens, 4 PPO epochs, 1 mini-batch (of 32),
full fine-tuning, no PPO-ptx. Random weights rarely end a turn early (about 45 of 48 tokens on
average), close to the worst case for generation. Everything is built offline.

    .venv/bin/python benchmarks/ppo_step.py [--steps 8] [--warmup 2] [--hidden 128 --layers 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(tmp: Path, hidden: int, layers: int) -> tuple[Path, Path, Path]:
    """(base folder, reward folder, prompts file) built from config, no downloads."""
    from transformers import AutoModelForSequenceClassification

    from direct_rlhf.config import ModelConfig, WorldConfig
    from direct_rlhf.data.toyworld.generate import write_world
    from direct_rlhf.io import read_jsonl
    from direct_rlhf.models.factory import tiny_mistral
    from direct_rlhf.models.tokenizer import train_tokenizer

    world = tmp / "world"
    write_world(WorldConfig(n_dialogues=2000, n_pairs=100, n_ppo_prompts=256), world)
    tok = train_tokenizer([r["text"] for r in read_jsonl(world / "corpus.jsonl")], 2048)
    mc = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=max(2, hidden // 32),
                     num_kv_heads=max(1, hidden // 64), intermediate_size=hidden * 3)
    base = tmp / "base"
    tiny_mistral(mc, tok, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp / "reward")
    tok.save_pretrained(tmp / "reward")
    (tmp / "reward" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "max_len": 256}))
    return base, tmp / "reward", world / "ppo_prompts.jsonl"


def run(hidden: int, layers: int, steps: int, warmup: int) -> dict:
    from direct_rlhf.config import load_config
    from direct_rlhf.train.ppo import PPOTrainer, load_prompts

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base, reward, prompts = build(tmp, hidden, layers)
        cfg = load_config(None, ["ppo.rollout_batch_size=32", "ppo.mini_batch_size=32", "ppo.ppo_epochs=4",
                                 "ppo.max_new_tokens=48", f"ppo.steps={steps + warmup}", "ppo.save_every=100000", "ppo.ptx_coef=0", "ppo.lora.enabled=false",
                                 "ppo.sample_every=100000"])
        trainer = PPOTrainer(cfg, str(base), str(reward), load_prompts(prompts), tmp / "work", progress=False)
        rows = [trainer.step() for _ in range(steps + warmup)][warmup:]
    split = {k: statistics.median(r[f"time/{k}_s"] for r in rows)
             for k in ("generate", "score", "experience", "train")}
    return {"hidden": hidden, "layers": layers, "steps_timed": steps,
            "median_step_s": statistics.median(r["time/step_s"] for r in rows),
            "step_s": [r["time/step_s"] for r in rows], "median_split_s": split,
            "mean_response_tokens": statistics.mean(r["response/length"] for r in rows),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    res = run(args.hidden, args.layers, args.steps, args.warmup)
    res.update({"machine": platform.platform(), "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "torch": torch.__version__})
    print(f"PPO step (hidden {res['hidden']}, {res['layers']} layers, 32 prompts x 48 tokens, 4 epochs, 1 mini-batch)")
    print(f"  median step: {res['median_step_s']:.2f} s   peak RSS: {res['peak_rss_mib']:.0f} MiB")
    print("  split (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in res["median_split_s"].items()))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
