"""Our PPO step against TRL's PPOTrainer on the same models and config, side by side in one run.

For each size (default: hidden 128 x 4 layers, and hidden 512 x 6 layers: 512 x 8 takes the run
past 10 minutes on 2 cores; `--sizes 128x4,512x8` runs it) it builds one tiny base
model and one reward model from config (offline, random weights, the toy tokenizer), then runs
(a) our `PPOTrainer` and (b) TRL's `trl.experimental.ppo.PPOTrainer` (trl==1.12.0, installed once
into its own virtual env, `benchmarks/.venv-trl`, pinned to our torch/transformers/accelerate
versions so only the PPO code differs) in alternating fresh processes: 32 prompts, 48 new tokens,
temperature 1, 4 PPO epochs, 1 mini-batch of 32 rows run as 4 micro-batches of 8 (gradient
accumulation, on both sides), full fine-tuning, fp32 (`--bf16`: bfloat16 mixed precision on both
sides: our `ppo.bf16`, TRL under `accelerate launch --mixed_precision bf16`'s setting), separate
reference, reward and value models. Each process warms up, then times its steps; peak RSS is the
process's.

Reported per size and side: median s/step, peak RSS, median time split (generate / score /
experience / train), generation tokens/s; ratios ours/TRL (`time_ratio`, `memory_ratio`); our
training phase's FLOP/s (torch's FLOP counter) against this machine's matrix-product peak in the
run's precision, measured here with 2048x2048 products.

    .venv/bin/python benchmarks/ppo_vs_trl.py [--out results.json] [--rounds 2 --steps 3 --warmup 1] [--bf16]
                                              [--attn eager] [--history-turns N] [--cpu] [--trl-python PY]

Where a GPU is present both sides run on it (`--cpu`: on the CPU), and memory is then compared as
torch's peak GPU allocation rather than RSS. `--trl-python` uses a python that already has
trl==1.12.0 instead of creating the env (benchmarks/gpu_check.sh does, on a machine with no registry).

`--history-turns N` puts 0..N earlier exchanges before each prompt, so prompt lengths spread as in
multi-turn chat data (the toy prompts alone are 10-79 tokens), to show what padding costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ppo_step import PHASES, build, summarise  # noqa: E402

TRL_VENV = HERE / ".venv-trl"
TRL_VERSION = "1.12.0"
# rows per training forward pass on both sides: our ppo.micro_batch_size default, and TRL's
# per_device_train_batch_size with gradient accumulation up to the 32-row mini-batch
MICRO_BATCH = 8
PROMPTS = "prompts.jsonl"  # under each size's model folder; both sides read it


def trl_python(venv: Path) -> Path:
    """The TRL env's python, created on first use with versions pinned to ours."""
    pins = [f"torch=={metadata.version('torch').split('+')[0]}", f"trl=={TRL_VERSION}"] + \
        [f"{p}=={metadata.version(p)}" for p in ("transformers", "accelerate", "datasets")]
    py, stamp = venv / "bin" / "python", venv / ".pins"
    if stamp.exists() and stamp.read_text() == " ".join(pins):
        return py
    print(f"setting up {venv} ({' '.join(pins)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], check=True)
    stamp.write_text(" ".join(pins))
    return py


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_peak_gflops(n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """The machine's matrix-product rate: the best of `reps` n x n products (a peak, so the
    best, not the median: a shared machine only ever slows a product down)."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def memory_key(cpu: bool) -> str:
    """The peak that memory is compared by: RSS on the CPU, torch's peak allocation on a GPU."""
    return "peak_rss_mib" if cpu else "peak_gpu_mib"


def run_side(side: str, models: Path, steps: int, warmup: int, trl_py: Path | str, bf16: bool, attn: str,
             cpu: bool) -> dict:
    out = models / f"{side}-{time.monotonic_ns()}.json"
    if side == "ours":
        cmd = [sys.executable, str(HERE / "ppo_step.py"), "--models", str(models), "--prompts", str(models / PROMPTS),
               "--set", f"ppo.micro_batch_size={MICRO_BATCH}", f"ppo.bf16={str(bf16).lower()}",
               f"ppo.attn_implementation={attn}"]
    else:
        cmd = [str(trl_py), str(HERE / "trl_ppo_worker.py"), "--base", str(models / "base"),
               "--reward", str(models / "reward"), "--prompts", str(models / PROMPTS),
               "--workdir", tempfile.mkdtemp(), "--micro-batch", str(MICRO_BATCH), *(["--bf16"] if bf16 else []),
               "--attn", attn]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else None
    proc = subprocess.run(cmd + ["--steps", str(steps), "--warmup", str(warmup), "--out", str(out)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    if side == "trl" and res["trl"] != TRL_VERSION:
        sys.exit(f"{trl_py} has trl {res['trl']}; this benchmark compares with trl {TRL_VERSION}")
    return res


def write_prompts(models: Path, history_turns: int, seed: int = 0) -> dict:
    """The prompts both sides read, `models/prompts.jsonl`: the toy world's PPO prompts, each after
    0..history_turns earlier exchanges (other prompts of the world, each answered " OK."), so that
    prompt lengths spread as in multi-turn chat data; returns their lengths in tokens."""
    from transformers import AutoTokenizer

    rows = [json.loads(line)["prompt"] for line in (models / "world" / "ppo_prompts.jsonl").open(encoding="utf-8")]
    rng = random.Random(seed)
    prompts = ["".join(f"{rng.choice(rows)} OK." for _ in range(rng.randint(0, history_turns))) + p for p in rows]
    (models / PROMPTS).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(models / "base")
    lengths = sorted(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    return {"history_turns": history_turns, "min": lengths[0], "median": statistics.median(lengths),
            "max": lengths[-1]}


def bench_size(hidden: int, layers: int, rounds: int, steps: int, warmup: int, trl_py: Path | str, tmp: Path,
               bf16: bool, attn: str, history_turns: int = 0, cpu: bool = True) -> dict:
    models = tmp / f"h{hidden}-l{layers}"
    models.mkdir()
    build(models, hidden, layers)
    prompt_tokens = write_prompts(models, history_turns)
    raw: dict[str, list[dict]] = {"ours": [], "trl": []}
    for r in range(rounds):
        order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")  # alternate who runs first
        for side in order:
            print(f"  hidden {hidden} x {layers} layers, round {r + 1}/{rounds}: {side} ...", flush=True)
            raw[side].append(run_side(side, models, steps, warmup, trl_py, bf16, attn, cpu))
    res = {}
    for side, runs in raw.items():
        merged = {"rows": [row for run in runs for row in run["rows"]],
                  **{k: max(run[k] for run in runs) for k in ("peak_rss_mib", "peak_gpu_mib") if k in runs[0]},
                  **{k: runs[0][k] for k in ("attn_implementation", "pack_rows") if k in runs[0]}}
        res[side] = summarise(merged)
    # TRL's training FLOP/s, estimated: our FLOPs per token position x the positions TRL processes
    # (it also runs the LM head over prompt positions, so this slightly underestimates its FLOPs)
    per_token = statistics.median(run["train_flops_per_token"] for run in raw["ours"])
    trl = res["trl"]
    trl["train_flop_per_s_estimated"] = per_token * trl["median_train_tokens"] / trl["median_split_s"]["train"]
    res["ours"]["train_flop_per_step"] = per_token * res["ours"]["median_train_tokens"]
    res["train_tokens_ratio"] = res["ours"]["median_train_tokens"] / trl["median_train_tokens"]
    res["time_ratio"] = res["ours"]["median_step_s"] / res["trl"]["median_step_s"]
    res["memory_ratio"] = res["ours"][memory_key(cpu)] / res["trl"][memory_key(cpu)]
    return {"hidden": hidden, "layers": layers, "steps_timed_per_side": rounds * steps, "prompt_tokens": prompt_tokens,
            **res}


def at_matmul_peak(size: dict, peak_gflop_per_s: float) -> dict:
    """Our step if its PPO epochs ran at the matrix-product peak (their FLOPs / the peak; the other
    phases as measured): a floor under our time with this algorithm and precision, and the time
    ratio against TRL it allows."""
    ours = size["ours"]
    train_s = ours["train_flop_per_step"] / (peak_gflop_per_s * 1e9)
    step_s = train_s + sum(v for k, v in ours["median_split_s"].items() if k != "train")
    return {"train_s": train_s, "step_s": step_s, "time_ratio": step_s / size["trl"]["median_step_s"]}


def print_table(result: dict) -> None:
    peak = result["matmul_peak_gflop_per_s"]
    on_gpu = result["device_type"] == "cuda"
    memory = memory_key(cpu=not on_gpu)
    where = result["device"] if on_gpu else f"{result['threads']} threads"
    print(f"\nPPO step, ours vs TRL {TRL_VERSION} (32 prompts x 48 tokens, 4 epochs, 1 mini-batch, "
          f"{result['precision']}, attention {result['attn_implementation']}, "
          f"{where}); matmul peak {peak:.0f} GFLOP/s")
    print(f"{'size':<12}{'side':<6}{'s/step':>8}{'GPU MiB' if on_gpu else 'RSS MiB':>9}  "
          f"{'gen / score / exp / train (s)':<32}{'gen tok/s':>10}")
    for s in result["sizes"]:
        pt = s["prompt_tokens"]
        print(f"{s['hidden']}x{s['layers']}: prompts of {pt['min']}-{pt['max']} tokens (median {pt['median']:g})")
        for side in ("ours", "trl"):
            r = s[side]
            split = " / ".join(f"{r['median_split_s'][k]:.2f}" for k in PHASES)
            print(f"{s['hidden']}x{s['layers']:<8}{side:<6}{r['median_step_s']:>8.2f}{r[memory]:>9.0f}  "
                  f"{split:<32}{r['generation_tokens_per_s']:>10.0f}")
        fl, tfl = s["ours"]["train_flop_per_s"] / 1e9, s["trl"]["train_flop_per_s_estimated"] / 1e9
        print(f"{'':<12}ratio ours/TRL: time {s['time_ratio']:.2f}, memory {s['memory_ratio']:.2f}, "
              f"training token positions {s['train_tokens_ratio']:.2f}")
        print(f"{'':<12}training: ours {fl:.0f} GFLOP/s ({fl / peak:.0%} of peak), "
              f"TRL ~{tfl:.0f} GFLOP/s (~{tfl / peak:.0%}, estimated)")
        floor = s["ours_at_matmul_peak"]
        print(f"{'':<12}ours with training at the peak: {floor['train_s']:.2f} s training, {floor['step_s']:.2f} s "
              f"a step, time ratio {floor['time_ratio']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128x4,512x6", help="comma-separated HIDDENxLAYERS")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per side and size")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--trl-venv", type=Path, default=TRL_VENV)
    p.add_argument("--trl-python", help=f"a Python that already has trl=={TRL_VERSION} and our torch and "
                   "transformers, used instead of creating --trl-venv (e.g. on a machine with no package registry)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU where a GPU is present (default: the GPU)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision on both sides")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="sdpa",
                   help="attention implementation on both sides (default: sdpa, transformers' own); with our "
                   "packed rows (ppo.pack_rows) our actor, reference and critic run it on the rows' grid")
    p.add_argument("--history-turns", type=int, default=0, metavar="N",
                   help="put 0..N earlier exchanges before each prompt (longer, more spread prompt lengths)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.trl_python and not shutil.which(args.trl_python):
        p.error(f"--trl-python {args.trl_python}: no such program")
    trl_py = args.trl_python or trl_python(args.trl_venv)
    cpu = args.cpu or not torch.cuda.is_available()
    device = "cpu" if cpu else "cuda"
    t0 = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpu": cpu_name(),
              "device_type": device, "device": cpu_name() if cpu else torch.cuda.get_device_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "trl": TRL_VERSION,
              "precision": "bf16 mixed" if args.bf16 else "fp32",
              "attn_implementation": args.attn, "sizes": []}
    n = 2048 if cpu else 8192  # a product that fills the device
    peak_before = matmul_peak_gflops(n, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes.split(","):
            hidden, layers = (int(x) for x in size.lower().split("x"))
            result["sizes"].append(bench_size(hidden, layers, args.rounds, args.steps, args.warmup, trl_py, Path(d),
                                             args.bf16, args.attn, args.history_turns, cpu))
            if args.out:  # what is done so far, should a later size not finish
                args.out.write_text(json.dumps({**result, "partial": True}, indent=2))
    # measured before and after the runs; the higher is the peak
    result["matmul_gflop_per_s_before_after"] = [peak_before, matmul_peak_gflops(n, dtype=dtype, device=device)]
    result["matmul_peak_gflop_per_s"] = max(result["matmul_gflop_per_s_before_after"])
    for size in result["sizes"]:
        size["ours_at_matmul_peak"] = at_matmul_peak(size, result["matmul_peak_gflop_per_s"])
    result["wall_s"] = time.perf_counter() - t0
    print_table(result)
    print(f"benchmark wall time {result['wall_s'] / 60:.1f} min (TRL env set-up excluded)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
