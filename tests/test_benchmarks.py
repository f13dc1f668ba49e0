"""The benchmarks still run against the code they instrument (ppo_step wraps private methods)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ppo_step_benchmark_reports_times_throughput_and_flops(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ppo_step.py"), "--hidden", "32", "--layers", "1",
                    "--steps", "2", "--warmup", "1", "--set", "ppo.max_new_tokens=8", "ppo.rollout_batch_size=8",
                    "ppo.mini_batch_size=8", "threads=1", "--out", str(out)], check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert len(res["step_s"]) == 2 and res["median_step_s"] > 0
    assert sum(res["median_split_s"].values()) <= res["median_step_s"] * 1.05
    assert res["generation_tokens_per_s"] > 0 and res["train_flop_per_s"] > 1e6
    assert res["peak_rss_mib"] > 50


def test_reward_packing_benchmark_runs_both_paths(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reward_packing.py"), "--steps", "2",
                    "--batch-size", "4", "--out", str(out)], check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert res["median_s"]["packed"] > 0 and res["median_s"]["two_rows"] > 0
    assert res["real_tokens_per_step"]["packed"] < res["real_tokens_per_step"]["two_rows"]


def test_logprob_memory_benchmark_runs_both_ways(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "logprob_memory.py"), "--vocab", "500", "--rows", "2",
                    "--tokens", "4", "--out", str(out)], check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["runs"]] == ["step_by_step", "output_logits"]
    assert all(r["shape"] == [2, 4] and r["peak_rss_mib"] >= r["rss_before_generate_mib"] for r in res["runs"])
