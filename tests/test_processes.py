"""Scaling the reward model trainer: several processes (torchrun on the CPU, gloo) train it data
parallel as one process would, micro-batches, gradient checkpointing and mid-epoch resume; and a
launch of several processes never leaves an upstream stage to be built behind a barrier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MICRO
from safetensors.torch import load_file

from direct_rlhf.cli import main
from direct_rlhf.config import load_config
from direct_rlhf.data.preferences import load_pairs
from direct_rlhf.errors import UserError
from direct_rlhf.io import read_jsonl
from direct_rlhf.models.factory import tiny_mistral
from direct_rlhf.models.tokenizer import train_tokenizer
from direct_rlhf.train.reward import PreferenceData, train_preference_model


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, small_world):
    """A random-init micro Mistral with the toy tokenizer, saved as a plain HF folder (no pretraining)."""
    cfg = load_config(None, MICRO)
    tok = train_tokenizer([r["text"] for r in read_jsonl(small_world / "corpus.jsonl")], cfg.model.vocab_size)
    out = tmp_path_factory.mktemp("tiny") / "base"
    tiny_mistral(cfg.model, tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`direct-rlhf ARGS` in two real processes on the CPU (as tests/test_ppo.py launches PPO)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "direct_rlhf", "-q", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_two_processes_train_the_reward_model_as_one_process_on_the_same_global_batch(tmp_path, tiny_base,
                                                                                       small_world):
    """reward.batch_size=16 is the global batch: 2 processes x 8 pairs (each in 2 passes of 4), their
    gradients summed, give the weights, held-out accuracy and statistics of one process taking 16
    pairs in one pass (fails when the all-reduce is skipped: each process then trains on its half)."""
    common = [*MICRO, f"model.base={tiny_base}", "reward.epochs=1", "reward.batch_size=16", "reward.stats_pairs=0",
              "reward.eval_every=4", "reward.log_every=1", f"reward.data={small_world / 'pairs_train.jsonl'}",
              f"reward.eval_data={small_world / 'pairs_eval.jsonl'}"]
    res = _torchrun("reward", "--out", str(tmp_path / "two"), *common, "reward.micro_batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("reward model: ") == 1, res.stdout  # said once, not once per process
    assert main(["-q", "reward", "--out", str(tmp_path / "one"), *common]) == 0
    two, one = tmp_path / "two" / "reward", tmp_path / "one" / "reward"
    a, b = _weights(two), _weights(one)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    held = [json.loads((f / "eval.json").read_text())["heldout"] for f in (two, one)]
    assert held[0].keys() == held[1].keys() and all(abs(held[0][k] - held[1][k]) < 1e-4 for k in held[1])
    stats = [json.loads((f / "reward_stats.json").read_text()) for f in (two, one)]
    assert stats[0]["n"] == stats[1]["n"] and abs(stats[0]["mean"] - stats[1]["mean"]) < 1e-4
    # one log, written by the first process, with the loss of the whole global batch
    rows = [[json.loads(line) for line in (tmp_path / run / "logs" / "reward" / "metrics.jsonl").read_text()
             .splitlines()] for run in ("two", "one")]
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
    assert len(losses[0]) == len(losses[1]) > 0 and max(abs(x - y) for x, y in zip(*losses)) < 1e-4
    assert json.loads((two / "run_info.json").read_text())["processes"] == 2


def _data(small_world: Path, n: int = 48) -> PreferenceData:
    pairs, _ = load_pairs(small_world / "pairs_train.jsonl")
    return PreferenceData(pairs[:n], pairs[n:n + 16], {"train_load": {}}, key=None)


def test_micro_batches_accumulate_to_one_pass(tmp_path, tiny_base, small_world):
    data = _data(small_world)
    common = ["reward.epochs=2", "reward.batch_size=16", "reward.eval_every=1000", "reward.stats_pairs=16"]
    whole = train_preference_model(load_config(None, [*MICRO, *common]), str(tiny_base), data, tmp_path / "whole",
                                   tmp_path / "lw", "k", progress=False)
    parts = train_preference_model(load_config(None, [*MICRO, *common, "reward.micro_batch_size=5"]), str(tiny_base),
                                   data, tmp_path / "parts", tmp_path / "lp", "k", progress=False)
    a, b = _weights(whole), _weights(parts)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_a_run_killed_in_the_middle_of_an_epoch_resumes_to_the_same_model(tmp_path, tiny_base, small_world,
                                                                          monkeypatch):
    import direct_rlhf.train.reward as reward_mod

    data = _data(small_world, 64)  # 4 batches an epoch
    cfg = load_config(None, [*MICRO, "reward.epochs=2", "reward.batch_size=16", "reward.eval_every=1000",
                             "reward.stats_pairs=16", "reward.log_every=1", "reward.save_every=3"])
    full = train_preference_model(cfg, str(tiny_base), data, tmp_path / "full", tmp_path / "lf", "k", progress=False)
    calls, real = {"n": 0}, reward_mod.pair_loss

    def dies_at_step_six(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:  # checkpoints after step 3 (epoch 1, batch 3 of 4) and 4 (its end): killed at 6
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reward_mod, "pair_loss", dies_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        train_preference_model(cfg, str(tiny_base), data, tmp_path / "part", tmp_path / "lp", "k", progress=False)
    # resumed from the newest checkpoint in the middle of the first epoch: drop the epoch's end one
    from direct_rlhf.train import checkpoint

    ckpts = checkpoint.completed(tmp_path / "lp" / "checkpoints")
    assert [checkpoint.step_of(p) for p in ckpts] == [3, 4]
    import shutil

    shutil.rmtree(ckpts[-1])
    assert checkpoint.trainer_state(ckpts[0])["batch"] == 3
    monkeypatch.setattr(reward_mod, "pair_loss", real)
    part = train_preference_model(cfg, str(tiny_base), data, tmp_path / "part", tmp_path / "lp", "k", progress=False)
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = {d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("lf", "lp")}
    assert [(r["step"], sorted(r)) for r in rows["lp"]] == [(r["step"], sorted(r)) for r in rows["lf"]]
    assert [r.get("loss") for r in rows["lp"]] == [r.get("loss") for r in rows["lf"]]


def test_a_global_batch_that_does_not_divide_among_the_processes_is_one_line(tmp_path, tiny_base, small_world,
                                                                             monkeypatch):
    import accelerate

    class TwoProcesses:
        num_processes, process_index, is_main_process = 2, 0, True

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", TwoProcesses)
    cfg = load_config(None, [*MICRO, "reward.batch_size=15"])
    with pytest.raises(UserError, match=r"reward.batch_size=15 .* multiple of 2$"):
        train_preference_model(cfg, str(tiny_base), _data(small_world), tmp_path / "r", tmp_path / "l", "k",
                               progress=False)
    assert not (tmp_path / "r").exists() and not (tmp_path / "l").exists()


def test_several_processes_refuse_to_build_an_upstream_stage_behind_a_barrier(tmp_path, tiny_base, small_world):
    """Without the rule, the first process would train the reward model while the other waits at a
    barrier (which times out at 7B): instead every process stops at once, with one line naming the
    command that builds it; in one process the same command builds it as before."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                               for r in list(read_jsonl(small_world / "ppo_prompts.jsonl"))[:8]))
    args = ["ppo", "--out", str(tmp_path / "run"), *MICRO, f"model.base={tiny_base}", f"ppo.prompts={prompts}",
            f"reward.data={small_world / 'pairs_train.jsonl'}", f"reward.eval_data={small_world / 'pairs_eval.jsonl'}",
            "reward.epochs=1", "ppo.steps=1", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
            "ppo.max_new_tokens=4", "ppo.ptx_coef=0", "ppo.lora.enabled=false"]
    res = _torchrun(*args)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("direct-rlhf: error: ")]
    assert len(lines) == 2 and lines[0] == lines[1], res.stderr[-3000:]  # each process, one line
    assert "2 processes launched, but the reward model" in lines[0]
    assert f"run 'direct-rlhf reward --out {tmp_path / 'run'} " in lines[0] and lines[0].endswith("first (one process)")
    assert not (tmp_path / "run" / "reward").exists() and not (tmp_path / "run" / "rlhf-work").exists()
    # the toy base (model.base unset) and its world: pretrain builds them
    res = _torchrun("ppo", "--out", str(tmp_path / "toy"), *MICRO)
    lines = [line for line in res.stderr.splitlines() if line.startswith("direct-rlhf: error: ")]
    assert res.returncode != 0 and len(lines) == 2, res.stderr[-3000:]
    assert "the toy world" in lines[0] and "run 'direct-rlhf pretrain --out " in lines[0]
    assert not (tmp_path / "toy" / "world").exists()


def test_gradient_checkpointing_trains_the_reward_model_to_the_same_weights(tmp_path, tiny_base, small_world):
    from direct_rlhf.models.reward_model import build_reward_model

    cfg = load_config(None, [*MICRO, "model.gradient_checkpointing=true"])
    model = build_reward_model(str(tiny_base), cfg)[0]
    assert getattr(model, "is_activation_checkpointing", False) or model.is_gradient_checkpointing
    data, common = _data(small_world), ["reward.epochs=1", "reward.batch_size=16", "reward.eval_every=1000",
                                        "reward.stats_pairs=16"]
    plain = train_preference_model(load_config(None, [*MICRO, *common]), str(tiny_base), data, tmp_path / "a",
                                   tmp_path / "la", "k", progress=False)
    ckpt = train_preference_model(load_config(None, [*MICRO, *common, "model.gradient_checkpointing=true"]),
                                  str(tiny_base), data, tmp_path / "b", tmp_path / "lb", "k", progress=False)
    a, b = _weights(plain), _weights(ckpt)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_the_sft_command_under_two_processes_says_its_result_once(tmp_path, tiny_base, small_world):
    """`direct-rlhf sft` under torchrun trains data parallel (tests/test_sharding.py checks the
    weights) and, like reward and ppo, prints its result line from one process, not from each."""
    res = _torchrun("sft", "--out", str(tmp_path), *MICRO, f"model.base={tiny_base}", "sft.batch_size=8",
                    f"sft.data={small_world / 'pairs_train.jsonl'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("sft model: ") == 1, res.stdout
