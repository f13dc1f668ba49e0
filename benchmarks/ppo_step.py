"""Median seconds per PPO step and peak memory at a fixed configuration.

Fixed config (the one issue #4 names, so numbers compare across commits and with peers): a tiny
Mistral built from config (hidden 128, 4 layers, vocab ~2k, toy tokenizer), a reward model with a
head on the same backbone, 32 prompts, 48 new tokens, 4 PPO epochs, 1 mini-batch (of 32),
full fine-tuning, no PPO-ptx, SDPA attention, packed rows (the library's defaults). Random weights
rarely end a turn early (about 45 of 48 tokens on average), close to the worst case for generation.
Everything is built offline.

    .venv/bin/python benchmarks/ppo_step.py [--steps 8] [--warmup 2] [--hidden 128 --layers 4] [--out FILE]
                                            [--set ppo.micro_batch_size=32 ...]
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

PHASES = ("generate", "score", "experience", "train")


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


def attention_flop_formulas() -> dict:
    """torch's FLOP formulas for the fused attention kernels, taking grouped-query attention: on a GPU
    transformers hands them key/value tensors with fewer heads than the query's (`enable_gqa`), which
    older torch rejects (2.11 did, on an H200). The kernel broadcasts those heads, so they count as the
    query's."""
    from torch.utils import flop_counter as fc

    def widened(q, *kv):
        return [(s[0], q[1], *s[2:]) for s in kv]

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, *widened(q, k, v))

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, *widened(q, k, v))

    aten, out = torch.ops.aten, {}
    for kernel in ("efficient", "flash", "cudnn"):
        name = f"_scaled_dot_product_{kernel}_attention"
        if hasattr(aten, name):
            out.update({getattr(aten, name): forward, getattr(aten, f"{name}_backward"): backward})
    return out


def time_ours(base: Path, reward: Path, prompts: Path, workdir: Path, steps: int, warmup: int,
              overrides: list[str] = ()) -> dict:
    """Per-step times of our PPOTrainer on prebuilt models, and the training phase's FLOP/s.

    FLOPs are counted (torch's FLOP counter: matrix products, forward and backward) during the
    first warm-up step's first mini-batch (every epoch does the same work, and the counter slows
    what it counts: at 512 x 6 by ~7 s a step over all four epochs), per token processed; each
    timed step's FLOP/s is then that rate x the tokens its PPO epochs processed / its training
    time, so the counter's own overhead never enters a timed step."""
    from torch.utils.flop_counter import FlopCounterMode

    from direct_rlhf.config import load_config
    from direct_rlhf.data.prompt_files import prompt_texts
    from direct_rlhf.train.ppo import PPOTrainer

    if warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first step counts FLOPs)")
    # On top of the toy recipe, the library's defaults where the recipe sets its own for its tiny model:
    # SDPA attention (transformers' default, what TRL runs) and packed rows.
    cfg = load_config(None, ["ppo.rollout_batch_size=32", "ppo.mini_batch_size=32", "ppo.ppo_epochs=4",
                             "ppo.max_new_tokens=48", f"ppo.steps={steps + warmup}", "ppo.save_every=100000",
                             "ppo.ptx_coef=0", "ppo.lora.enabled=false", "ppo.sample_every=100000",
                             "ppo.attn_implementation=sdpa", "ppo.pack_rows=true", *overrides])
    trainer = PPOTrainer(cfg, str(base), str(reward), prompt_texts(prompts), workdir, progress=False)
    count = {"on": False, "tokens": 0}
    micro_batches, rl_step, opt_step = trainer._micro_batches, trainer.rl_step, trainer._step

    def counting_micro_batches(*args):
        for mb in micro_batches(*args):
            seq = mb.seq if mb.packed is None else mb.packed.seq  # positions the models process
            count["tokens"] += seq.numel() if count["on"] else 0
            yield mb

    def counting_rl_step(exp):
        count.update(on=True, tokens=0)
        try:
            return rl_step(exp)
        finally:
            count["on"] = False

    def flop_counting_rl_step(exp):  # the counter stops once the first mini-batch has updated the actor
        counter = FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())

        def stop_after_the_actor(model, opt):
            opt_step(model, opt)
            if model is trainer.actor and count["on"]:
                counter.__exit__(None, None, None)
                count.update(on=False, flops=counter.get_total_flops())

        count.update(on=True, tokens=0)
        trainer._step = stop_after_the_actor
        counter.__enter__()
        try:
            return rl_step(exp)
        finally:
            trainer._step = opt_step
            if count["on"]:  # rl_step raised before the actor's update
                counter.__exit__(None, None, None)
                count["on"] = False

    trainer._micro_batches, trainer.rl_step = counting_micro_batches, flop_counting_rl_step
    rows = []
    for i in range(steps + warmup):
        r = trainer.step()
        if i == 0:
            flops_per_token = count["flops"] / count["tokens"]
            trainer.rl_step = counting_rl_step
        rows.append({"step_s": r["time/step_s"], **{f"{k}_s": r[f"time/{k}_s"] for k in PHASES},
                     "generated_tokens": r["response/length"] * cfg.ppo.rollout_batch_size,
                     "train_tokens": count["tokens"],  # positions over the epochs, per model
                     "train_flop_per_s": flops_per_token * count["tokens"] / r["time/train_s"]})
    return {"rows": rows[warmup:], **peak_memory(),
            "train_flops_per_token": flops_per_token, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "attn_implementation": cfg.ppo.attn_implementation, "pack_rows": cfg.ppo.pack_rows}


def peak_memory() -> dict:
    """This process's peak resident memory and, on a GPU, the most device memory torch held allocated
    at once (what a model's tensors need, without the allocator's cache)."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out.update(peak_gpu_mib=torch.cuda.max_memory_allocated() / 2 ** 20, device=torch.cuda.get_device_name())
    return out


def summarise(res: dict) -> dict:
    rows = res["rows"]
    gen_s = sum(r["generate_s"] for r in rows)
    return {"median_step_s": statistics.median(r["step_s"] for r in rows),
            "step_s": [round(r["step_s"], 4) for r in rows],
            "median_split_s": {k: statistics.median(r[f"{k}_s"] for r in rows) for k in PHASES},
            "generation_tokens_per_s": sum(r["generated_tokens"] for r in rows) / gen_s,
            "median_train_tokens": statistics.median(r["train_tokens"] for r in rows),
            **({"train_flop_per_s": statistics.median(r["train_flop_per_s"] for r in rows)}
               if "train_flop_per_s" in rows[0] else {}),
            **{k: res[k] for k in ("peak_rss_mib", "peak_gpu_mib", "device", "attn_implementation", "pack_rows")
               if k in res}}  # as the run reports them


def run(hidden: int, layers: int, steps: int, warmup: int, overrides: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base, reward, prompts = build(tmp, hidden, layers)
        res = time_ours(base, reward, prompts, tmp / "work", steps, warmup, overrides=overrides)
    return {"hidden": hidden, "layers": layers, "steps_timed": steps, **summarise(res)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for a variant, e.g. ppo.micro_batch_size=32")
    p.add_argument("--models", type=Path, help="(used by ppo_vs_trl.py) a folder from build(): time only, "
                   "write the raw per-step rows to --out")
    p.add_argument("--prompts", type=Path, help="with --models: the prompts file (default: the world's PPO prompts)")
    args = p.parse_args()
    if args.models:
        d = args.models
        prompts = args.prompts or d / "world" / "ppo_prompts.jsonl"
        res = time_ours(d / "base", d / "reward", prompts, Path(tempfile.mkdtemp()), args.steps, args.warmup,
                        overrides=args.set)
        args.out.write_text(json.dumps(res, indent=2))
        return
    res = run(args.hidden, args.layers, args.steps, args.warmup, args.set)
    res.update({"machine": platform.platform(), "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "torch": torch.__version__})
    print(f"PPO step (hidden {res['hidden']}, {res['layers']} layers, 32 prompts x 48 tokens, 4 epochs, 1 mini-batch)")
    gpu = f"   peak GPU memory: {res['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in res else ""
    print(f"  median step: {res['median_step_s']:.2f} s   peak RSS: {res['peak_rss_mib']:.0f} MiB{gpu}")
    print("  split (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in res["median_split_s"].items()))
    print(f"  generation: {res['generation_tokens_per_s']:.0f} tokens/s   "
          f"training: {res['train_flop_per_s'] / 1e9:.1f} GFLOP/s")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
