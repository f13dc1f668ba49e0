"""PPO's wall time with the balance guard against without it, side by side, same seeds.

The toy model's size (hidden 128, 4 layers, random weights built offline: they rarely end a turn,
the worst case for generation), the toy recipe's PPO settings, the toy world's validation sets at
their default sizes. Each repeat trains `--steps` steps twice from the same start, once without the
guard and once with `ppo.select=balanced ppo.eval_every=E`; reported: median wall time of each,
their ratio, the median seconds of one guard evaluation and of one PPO step, and what those give
for the demo's schedule (200 steps, an evaluation every 25 and one of the start policy).

    .venv/bin/python benchmarks/guard_overhead.py [--steps 20] [--eval-every 10] [--repeats 2] [--out FILE]
        [--run runs/toy]   # a demo run folder: its base, seed-0 reward model and world instead (trained
                           # models end their turns, as in the demo; random ones rarely do)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def run(tmp: Path, base: Path, reward: Path, world: Path, steps: int, eval_every: int, guarded: bool,
        threads: int) -> dict:
    from direct_rlhf.config import load_config
    from direct_rlhf.data.prompt_files import prompt_texts
    from direct_rlhf.eval import validation
    from direct_rlhf.pipeline import _balance_guard
    from direct_rlhf.train.ppo import PPOTrainer

    torch.set_num_threads(threads)
    extra = [f"ppo.steps={steps}", "ppo.ptx_coef=0", f"ppo.save_every={eval_every}", "ppo.attn_implementation=eager",
             "ppo.pack_rows=false"]
    if guarded:
        extra += ["ppo.select=balanced", f"ppo.eval_every={eval_every}"]
    cfg = load_config(None, extra)
    out = tmp / ("guarded" if guarded else "plain")
    evals: list[float] = []
    real = validation.Validator.evaluate

    def timed(self, model):
        t = time.perf_counter()
        try:
            return real(self, model)
        finally:
            evals.append(time.perf_counter() - t)

    validation.Validator.evaluate = timed
    try:
        t0 = time.perf_counter()
        trainer = PPOTrainer(cfg, str(base), str(reward), prompt_texts(world / "ppo_prompts.jsonl"), out, key="bench",
                             progress=False)
        guard = _balance_guard(cfg, trainer, world, str(base), out) if guarded else None
        t_setup = time.perf_counter() - t0
        step_times: list[float] = []
        t1 = time.perf_counter()
        trainer.train(guard=guard)
        wall = time.perf_counter() - t1
        rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").open()]
        step_times = [r["time/step_s"] for r in rows if "time/step_s" in r]
    finally:
        validation.Validator.evaluate = real
    return {"wall_s": wall, "setup_s": t_setup, "evaluations_s": evals, "step_s_median": statistics.median(step_times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--run", type=Path, default=None, help="a demo run folder: its base, world and seed-0 reward model")
    args = ap.parse_args()
    from ppo_step import build

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.run:
            base, world = args.run / "base", args.run / "world"
            reward = next(p for p in (args.run / "seed-0" / "reward", args.run / "reward") if p.is_dir())
        else:
            base, reward, prompts = build(tmp, 128, 4)
            world = prompts.parent
        plain, guarded = [], []
        for i in range(args.repeats):  # alternated, so drifts of the machine hit both alike
            plain.append(run(tmp / f"r{i}", base, reward, world, args.steps, args.eval_every, False, args.threads))
            guarded.append(run(tmp / f"r{i}", base, reward, world, args.steps, args.eval_every, True, args.threads))
    evals = [e for g in guarded for e in g["evaluations_s"]]
    step = statistics.median(r["step_s_median"] for r in plain)
    one_eval = statistics.median(evals)
    result = {
        "benchmark": "guard_overhead", "steps": args.steps, "eval_every": args.eval_every, "repeats": args.repeats,
        "threads": args.threads, "models": str(args.run) if args.run else "random 128x4", "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "wall_s_without_guard_median": statistics.median(r["wall_s"] for r in plain),
        "wall_s_with_guard_median": statistics.median(r["wall_s"] for r in guarded),
        "evaluation_s_median": one_eval, "ppo_step_s_median": step,
        "runs": {"without": plain, "with": guarded},
    }
    result["ratio"] = result["wall_s_with_guard_median"] / result["wall_s_without_guard_median"]
    # the demo's schedule: 200 steps, the start policy and every 25th step evaluated (9 evaluations)
    result["demo_schedule_ratio_estimate"] = (200 * step + 9 * one_eval) / (200 * step)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
