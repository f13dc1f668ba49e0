"""What `model.strategy: fsdp` saves: each process's resident training state (parameters +
gradients + AdamW state, counted tensor by tensor; under FSDP2 each process's own shards) under
`fsdp` against `ddp`, on 2 CPU processes over gloo, for a Llama built from a config (512 hidden x
8 layers by default), and the seconds per training step (forward, backward, gradient reduction,
clipping, AdamW) at 1 and at 2 processes. Under fsdp it also times the two ways a sharded actor can
sample (`--rollout-tokens` new tokens for each process's rows, sampled, none stopping early):
gathering its weights for the call (unshard/reshard, train/sharding.whole_weights, what PPO does)
against copying them into a plain, whole model first (rollout/policy_weights.actor_weights, the
path to vLLM), which keeps a second copy of the model in every process. The CPU's cores are split between the processes
(OMP_NUM_THREADS = cores / processes), so 1 and 2 processes use the same cores. Each variant is a
fresh `torchrun`; the step is train/sharding.py's, as the SFT trainer runs it, on random tokens.

`--ppo-steps N` (default 6; 0 skips it) also times whole PPO steps (`direct-rlhf ppo` under
torchrun: sampling, scoring, experience, update) under each strategy at 1 and 2 processes, on
benchmarks/ppo_step.py's models (a hidden 128 x 4 layers Mistral and a reward model on it), 16
prompts a step (the global batch), 24 new tokens, 2 PPO epochs, full fine-tuning: the median of
`time/step_s` after 2 steps.

The count leaves out what FSDP gathers for the layer that is running (one layer's full
parameters and gradients at a time) and the activations. Peak RSS, reported beside it, has them
all, plus the libraries (~400 MiB) and the whole model every process builds before sharding it
(as the SFT trainer loads it), so it cannot show the saving at this size; the RSS after the steps
(glibc may keep freed memory mapped) is reported too. `MALLOC_MMAP_THRESHOLD_=1048576` in the
environment makes glibc return large freed blocks (recorded as `malloc_mmap_threshold`).

    .venv/bin/python benchmarks/sharding_memory.py [--hidden 512 --layers 8 --vocab 8192 --rows 8
        --tokens 128 --steps 6] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2))


def _bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def child(a: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "src"))
    from direct_rlhf.train import sharding

    device = sharding.init_processes()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                      num_key_value_heads=a.hidden // 64, tie_word_embeddings=False,
                      max_position_embeddings=max(a.tokens, 16 + a.rollout_tokens))  # rollouts: 16 prompt tokens
    model = LlamaForCausalLM(cfg).train().to(device)  # whole in every process, then sharded (as SFT loads it)
    n_params = sum(p.numel() for p in model.parameters())
    model = sharding.shard(model, a.strategy, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    share = sharding.split_batch(a.rows, "--rows")
    gen = torch.Generator().manual_seed(1000 + sharding.rank())
    times, state = [], {}
    for step in range(a.steps):
        ids = torch.randint(a.vocab, (share, a.tokens), generator=gen)
        sharding.barrier()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        sharding.clip_grad_norm(model, 1.0)
        if step == 0:
            grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        sharding.barrier()
        times.append(time.perf_counter() - t)
        if step == 0:
            params = _bytes(model.parameters())
            optim = _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
            state = {"params_mib": params / 2**20, "grads_mib": grads / 2**20, "optim_mib": optim / 2**20,
                     "state_mib": (params + grads + optim) / 2**20}
    row = {"rank": sharding.rank(), **state, "step_s": times[1:],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_after_steps_mib": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20}
    if a.strategy == "fsdp" and a.rollout_tokens:  # after the memory readings: the copy would be in them
        row.update(_rollout_times(model, cfg, a, device, share))
    rows = [row]
    if sharding.world_size() > 1:
        rows = [None] * sharding.world_size()
        torch.distributed.all_gather_object(rows, row)
    if sharding.is_main():
        Path(a.child_out).write_text(json.dumps({"n_params": n_params, "ranks": rows}))


def _rollout_times(model, cfg, a: argparse.Namespace, device, share: int) -> dict[str, list[float]]:
    """Seconds per rollout (weights made whole + generation), each way, alternating, first of each not kept."""
    from transformers import LlamaForCausalLM

    from direct_rlhf.rollout.policy_weights import actor_weights
    from direct_rlhf.train import sharding

    ids = torch.randint(a.vocab, (share, 16), generator=torch.Generator().manual_seed(7))
    kw = {"max_new_tokens": a.rollout_tokens, "min_new_tokens": a.rollout_tokens, "do_sample": True,
          "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    copy = LlamaForCausalLM(cfg).to(device).eval().requires_grad_(False)
    params = dict(copy.named_parameters())

    def unshard():
        with sharding.whole_weights(model):
            model.generate(ids, **kw)

    def gathered_copy():
        for name, w in actor_weights(model):
            params[name].copy_(w)
        copy.generate(ids, **kw)

    out: dict[str, list[float]] = {"rollout_unshard_s": [], "rollout_gathered_copy_s": []}
    model.eval()
    with torch.no_grad():
        for k in range(a.steps):
            for name, fn in (("rollout_unshard_s", unshard), ("rollout_gathered_copy_s", gathered_copy)):
                sharding.barrier()
                t = time.perf_counter()
                fn()
                sharding.barrier()
                if k:
                    out[name].append(time.perf_counter() - t)
    model.train()
    return out


def _run(cmd: list[str], env: dict, verbose: bool) -> None:
    """Run one torchrun; when it fails, exit with its last lines of output (not only its status)."""
    res = subprocess.run(cmd, env=env, capture_output=not verbose, text=True)
    if res.returncode:
        sys.exit(f"{' '.join(cmd[:6])} ... exited {res.returncode}:\n{(res.stderr or '')[-4000:]}")


def launch(a: argparse.Namespace, strategy: str, nproc: int, out: Path) -> dict:
    cores = len(os.sched_getaffinity(0))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, "--child", strategy, "--child-out", str(out), "--hidden", str(a.hidden), "--layers",
           str(a.layers), "--vocab", str(a.vocab), "--rows", str(a.rows), "--tokens", str(a.tokens),
           "--steps", str(a.steps), "--rollout-tokens", str(a.rollout_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc)), "ACCELERATE_USE_CPU": "true"}
    _run(cmd, env, a.verbose)
    res = json.loads(out.read_text())
    ranks = res["ranks"]
    return {"strategy": strategy, "processes": nproc, "threads_per_process": max(1, cores // nproc),
            "n_params": res["n_params"],
            "state_mib_per_process": max(r["state_mib"] for r in ranks),
            "split_mib_rank0": {k: ranks[0][k] for k in ("params_mib", "grads_mib", "optim_mib")},
            "peak_rss_mib_per_process": max(r["peak_rss_mib"] for r in ranks),
            "rss_after_steps_mib_per_process": max(r["rss_after_steps_mib"] for r in ranks),
            "median_step_s": statistics.median(s for r in ranks[:1] for s in r["step_s"]),
            "step_s": ranks[0]["step_s"],
            **{f"median_{k}": statistics.median(ranks[0][k]) for k in ("rollout_unshard_s", "rollout_gathered_copy_s")
               if ranks[0].get(k)}}


def ppo_steps(a: argparse.Namespace, tmp: Path) -> list[dict]:
    """Median seconds per PPO step, each strategy at 1 and 2 processes (fresh torchrun each)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ppo_step import build

    base, reward, prompts = build(tmp / "models", 128, 4)
    cores, rows = len(os.sched_getaffinity(0)), []
    for strategy, nproc in VARIANTS:
        out = tmp / f"ppo-{strategy}-{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "direct_rlhf", "-q", "ppo", "--out", str(out), f"model.base={base}",
               f"ppo.reward_model={reward}", f"ppo.prompts={prompts}", f"model.strategy={strategy}",
               f"ppo.steps={a.ppo_steps + 2}", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=16",
               "ppo.max_new_tokens=24", "ppo.ppo_epochs=2", "ppo.ptx_coef=0", "ppo.lora.enabled=false",
               "ppo.critic_lora.enabled=false", "ppo.select=last", "ppo.eval_every=0", "ppo.save_every=1000"]
        threads = a.threads or max(1, cores // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ACCELERATE_USE_CPU": "true",
               "PYTHONPATH": str(ROOT / "src")}
        _run(cmd, env, a.verbose)
        steps = [json.loads(line) for line in (out / "rlhf-work" / "logs" / "metrics.jsonl").read_text().splitlines()]
        times = [r["time/step_s"] for r in steps][2:]
        rows.append({"strategy": strategy, "processes": nproc, "threads_per_process": threads,
                     "median_ppo_step_s": statistics.median(times),
                     "ppo_step_s": times})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rows", type=int, default=8, help="global batch (rows), split over the processes")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="the first is warm-up, not timed in the median")
    p.add_argument("--rollout-tokens", type=int, default=32, help="fsdp: new tokens per timed rollout (0: none)")
    p.add_argument("--ppo-steps", type=int, default=6, help="timed PPO steps per variant (0: none)")
    p.add_argument("--only-ppo", action="store_true", help="only the PPO step times")
    p.add_argument("--threads", type=int, default=0, help="PPO steps: threads per process (0: the cores / processes)")
    p.add_argument("--out")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--child", choices=("ddp", "fsdp"))
    p.add_argument("--child-out")
    a = p.parse_args()
    if a.child:
        a.strategy = a.child
        child(a)  # returns having freed its models (a DDP model's reducer holds the group too)
        from direct_rlhf.train import sharding

        return sharding.close_processes()
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not a.only_ppo:
            runs = [launch(a, s, n, Path(tmp) / f"{s}-{n}.json") for s, n in VARIANTS]
            by = {(r["strategy"], r["processes"]): r for r in runs}
            res = {"model": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab,
                             "n_params": runs[0]["n_params"]},
                   "batch": {"rows": a.rows, "tokens": a.tokens}, "runs": runs,
                   "fsdp_over_ddp_state_2_processes":
                       by["fsdp", 2]["state_mib_per_process"] / by["ddp", 2]["state_mib_per_process"],
                   "fsdp_over_ddp_peak_rss_2_processes":
                       by["fsdp", 2]["peak_rss_mib_per_process"] / by["ddp", 2]["peak_rss_mib_per_process"]}
        if a.ppo_steps:
            res["ppo"] = {"model": {"hidden": 128, "layers": 4}, "rollout_batch_size": 16, "max_new_tokens": 24,
                          "runs": ppo_steps(a, Path(tmp))}
    res.update({"malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
           "torch": torch.__version__, "cores": len(os.sched_getaffinity(0)),
           "date": time.strftime("%Y-%m-%d", time.gmtime())})
    try:
        res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
