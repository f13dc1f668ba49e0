"""The benchmarks still run against the code they instrument (ppo_step wraps private methods)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_as_group

ROOT = Path(__file__).resolve().parents[1]


def test_ppo_step_benchmark_reports_times_throughput_and_flops(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ppo_step.py"), "--hidden", "32", "--layers", "1",
                    "--steps", "2", "--warmup", "1", "--set", "ppo.max_new_tokens=8", "ppo.rollout_batch_size=8",
                    "ppo.mini_batch_size=8", "threads=1", "--out", str(out)], check=True, capture_output=True)
    res = json.loads(out.read_text())
    # what it reports, not how fast: timings are the benchmark's job, never a test's
    assert len(res["step_s"]) == 2
    assert set(res["median_split_s"]) == {"generate", "score", "experience", "train"}
    assert {"generation_tokens_per_s", "train_flop_per_s", "peak_rss_mib"} <= set(res)
    assert res["median_train_tokens"] > 0
    # the library's defaults, not the toy recipe's (whose eager attention once leaked in here)
    assert (res["attn_implementation"], res["pack_rows"]) == ("sdpa", True)


def test_reward_packing_benchmark_runs_both_paths(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reward_packing.py"), "--steps", "2",
                    "--batch-size", "4", "--out", str(out)], check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert set(res["median_s"]) == {"packed", "two_rows"}
    assert res["real_tokens_per_step"]["packed"] < res["real_tokens_per_step"]["two_rows"]


def test_logprob_memory_benchmark_runs_both_ways(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "logprob_memory.py"), "--vocab", "500", "--rows", "2",
                    "--tokens", "4", "--out", str(out)], check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["runs"]] == ["step_by_step", "output_logits"]
    assert all(r["shape"] == [2, 4] and "peak_rss_mib" in r for r in res["runs"])


def test_sharding_memory_benchmark_counts_half_the_state_per_process_under_fsdp(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_as_group([sys.executable, str(ROOT / "benchmarks" / "sharding_memory.py"), "--hidden", "64",
                         "--layers", "2", "--vocab", "256", "--rows", "4", "--tokens", "16", "--steps", "2",
                         "--ppo-steps", "0",  # the PPO step times run whole PPO stages: 3.5 min even at this size
                         "--rollout-tokens", "4", "--out", str(out)],
                        None, timeout=300)  # past it, torchrun's workers are killed with it
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert [(r["strategy"], r["processes"]) for r in res["runs"]] == [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
    assert res["fsdp_over_ddp_state_2_processes"] == pytest.approx(0.5, abs=0.02)  # each process keeps its half
    assert all(len(r["step_s"]) == 1 and r["peak_rss_mib_per_process"] > 0 for r in res["runs"])
    assert all(("median_rollout_unshard_s" in r) == ("median_rollout_gathered_copy_s" in r) == (r["strategy"] == "fsdp")
               for r in res["runs"])


def test_side_by_side_prompts_spread_longer_stay_valid_and_reach_our_step(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ppo_step
    import ppo_vs_trl

    from direct_rlhf.data.chat_format import parse

    ppo_step.build(tmp_path, 32, 1)
    world = [json.loads(line)["prompt"] for line in (tmp_path / "world" / "ppo_prompts.jsonl").open()]
    plain = ppo_vs_trl.write_prompts(tmp_path, 0)
    assert [json.loads(line)["prompt"] for line in (tmp_path / "prompts.jsonl").open()] == world
    longer = ppo_vs_trl.write_prompts(tmp_path, 4)
    assert longer["median"] > plain["median"] and longer["max"] > plain["max"] and longer["min"] >= plain["min"]
    for line in (tmp_path / "prompts.jsonl").open():  # each a chat of alternating turns, ending in an open one
        turns = parse(json.loads(line)["prompt"])
        assert [m.role for m in turns] == ["user", "assistant"] * (len(turns) // 2) and turns[-1].content == ""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ppo_step.py"), "--models", str(tmp_path),
                    "--prompts", str(tmp_path / "prompts.jsonl"), "--steps", "1", "--warmup", "1",
                    "--set", "ppo.max_new_tokens=4", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
                    "threads=1", "--out", str(out)], check=True, capture_output=True)
    assert len(json.loads(out.read_text())["rows"]) == 1


def test_the_floor_at_the_matmul_peak_puts_only_training_at_the_peak():
    """2 TFLOP of PPO epochs at a 100 GFLOP/s peak: 20 s; plus the 1 + 0.5 + 0.5 s the other phases
    took: 22 s a step, 0.55 of TRL's 40 s."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ppo_vs_trl

    size = {"ours": {"train_flop_per_step": 2e12,
                     "median_split_s": {"generate": 1.0, "score": 0.5, "experience": 0.5, "train": 30.0}},
            "trl": {"median_step_s": 40.0}}
    assert ppo_vs_trl.at_matmul_peak(size, 100.0) == pytest.approx({"train_s": 20.0, "step_s": 22.0,
                                                                    "time_ratio": 0.55})


def test_attention_flops_count_grouped_query_heads_as_the_querys():
    """2 rows x 8 query heads over 2 key/value heads, 16 positions, head size 32: forward QK^T and PV
    are 2 x (2 x 8 x 16 x 16 x 32) FLOP each; backward recomputes QK^T and runs four such products."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ppo_step

    formulas = ppo_step.attention_flop_formulas()
    forward = formulas[torch.ops.aten._scaled_dot_product_flash_attention]
    backward = formulas[torch.ops.aten._scaled_dot_product_flash_attention_backward]
    one_product = 2 * 2 * 8 * 16 * 16 * 32
    q, kv = (2, 8, 16, 32), (2, 2, 16, 32)
    assert forward(q, kv, kv) == 2 * one_product
    assert backward(q, q, kv, kv) == 5 * one_product
