"""Scaling the reward model trainer: several processes (torchrun on the CPU, gloo) train it data
parallel as one process would, under model.strategy ddp and fsdp, micro-batches, gradient
checkpointing and mid-epoch resume (fsdp: a sharded checkpoint, on 2 or 1 processes); and a launch
of several processes never leaves an upstream stage to be built behind a barrier.

This file is also the worker of a run killed on purpose (`torchrun ... test_processes.py N ARGS`:
`direct-rlhf ARGS`, each process killed as its pair loss is asked for the (N+1)th time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MICRO, torchrun
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


def _torchrun(*args: str, nproc: int = 2, dies_after: int = 0, timeout: int = 240,
              quiet: bool = True) -> subprocess.CompletedProcess:
    """`direct-rlhf [-q] ARGS` in `nproc` real processes on the CPU (as tests/test_ppo.py launches PPO);
    `dies_after` > 0: every process killed as it starts its pair loss number `dies_after` + 1."""
    cmd = [*([__file__, str(dies_after)] if dies_after else ["-m", "direct_rlhf"]), *(["-q"] if quiet else []), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    return torchrun(nproc, cmd, env, timeout)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_base, small_world):
    """The reference run of the reward model: one process (ddp), the global batch of 16 in one pass."""
    common = [*MICRO, f"model.base={tiny_base}", "reward.epochs=1", "reward.batch_size=16", "reward.stats_pairs=0",
              "reward.eval_every=4", "reward.log_every=1", f"reward.data={small_world / 'pairs_train.jsonl'}",
              f"reward.eval_data={small_world / 'pairs_eval.jsonl'}"]
    out = tmp_path_factory.mktemp("one")
    assert main(["-q", "reward", "--out", str(out), *common]) == 0
    return out, common


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_reward_model_as_one_process_on_the_same_global_batch(tmp_path, one_process,
                                                                                       strategy):
    """reward.batch_size=16 is the global batch: 2 processes x 8 pairs (each in 2 passes of 4), their
    gradients summed, give the weights, held-out accuracy and statistics of one process taking 16
    pairs in one pass (fails when the all-reduce is skipped: each process then trains on its half).
    fsdp: the model sharded over the two, scored with its weights gathered, exported whole as a
    plain Hugging Face folder that transformers loads, scoring as the one-process model does."""
    from transformers import AutoModelForSequenceClassification

    one, common = one_process
    res = _torchrun("reward", "--out", str(tmp_path / "two"), *common, "reward.micro_batch_size=4",
                    f"model.strategy={strategy}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("reward model: ") == 1, res.stdout  # said once, not once per process
    two, one = tmp_path / "two" / "reward", one / "reward"
    models = [AutoModelForSequenceClassification.from_pretrained(f).eval() for f in (two, one)]
    assert type(models[0]).__name__ == type(models[1]).__name__ == "MistralForSequenceClassification"
    ids = torch.tensor([[5, 17, 33, 9, 41, 2]])
    with torch.no_grad():
        scores = [m(input_ids=ids).logits for m in models]
    assert torch.allclose(*scores, atol=1e-4) and not torch.allclose(scores[0], torch.zeros(1), atol=1e-3), scores
    a, b = _weights(two), _weights(one)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    held = [json.loads((f / "eval.json").read_text())["heldout"] for f in (two, one)]
    assert held[0].keys() == held[1].keys() and all(abs(held[0][k] - held[1][k]) < 1e-4 for k in held[1])
    stats = [json.loads((f / "reward_stats.json").read_text()) for f in (two, one)]
    assert stats[0]["n"] == stats[1]["n"] and abs(stats[0]["mean"] - stats[1]["mean"]) < 1e-4
    # one log, written by the first process, with the loss of the whole global batch
    rows = [[json.loads(line) for line in (run.parent / "logs" / "reward" / "metrics.jsonl").read_text()
             .splitlines()] for run in (two, one)]
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
    assert len(losses[0]) == len(losses[1]) > 0 and max(abs(x - y) for x, y in zip(*losses)) < 1e-4
    assert json.loads((two / "run_info.json").read_text())["processes"] == 2


def test_a_command_leaves_its_process_group_once_it_has_finished(tmp_path, one_process):
    """Left to the interpreter's exit, gloo's worker threads abort a process now and then
    ('terminate called without an active exception', SIGABRT: torchrun then reports a finished run
    as failed; it was seen in CI). A command that made a group (here fsdp's group of one, in this
    process) destroys it once its work is done."""
    one, common = one_process
    assert main(["-q", "reward", "--out", str(tmp_path), *common, "model.strategy=fsdp"]) == 0
    assert (tmp_path / "reward" / "model.safetensors").exists()
    assert not torch.distributed.is_initialized()


def test_fsdp_with_bf16_compute_cpu_offload_and_activation_checkpointing_trains_close_to_fp32(tmp_path,
                                                                                             one_process):
    """model.dtype=bfloat16 under fsdp: the layers compute in bf16 from fp32 master weights (saved
    float32), the score head in float32 as in every role (its own shard unit: the root's weights
    are gathered in bf16, which a float32 head cannot take); losses within bf16's reach of fp32's."""
    one, common = one_process
    res = _torchrun("reward", "--out", str(tmp_path), *common, "reward.micro_batch_size=4", "model.strategy=fsdp",
                    "model.dtype=bfloat16", "model.fsdp_cpu_offload=true", "model.gradient_checkpointing=true")
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [[json.loads(line).get("loss") for line in (run / "logs" / "reward" / "metrics.jsonl").read_text()
               .splitlines()] for run in (tmp_path, one)]
    gaps = [abs(x - y) for x, y in zip(*losses) if x is not None]
    assert len(gaps) > 10 and 1e-5 < max(gaps) < 0.01, losses
    assert all(w.dtype == torch.float32 for w in _weights(tmp_path / "reward").values())


def test_a_sharded_run_killed_in_the_middle_of_an_epoch_resumes_on_two_or_one_process_to_the_same_model(
        tmp_path, tiny_base, small_world):
    """fsdp on 2 processes, killed in step 6 of 8 (57 pairs: 4 batches an epoch, the last of 9, so
    the first process runs a pass more than the second, which runs one without pairs); resumed from
    its DCP checkpoint in the middle of the first epoch (step 3), on 2 processes it equals the run
    that was never killed, on 1 process (resharded) it does within 1e-4."""
    import shutil

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((small_world / "pairs_train.jsonl").read_text().splitlines(keepends=True)[:57]))
    args = [*MICRO, f"model.base={tiny_base}", "model.strategy=fsdp", "reward.epochs=2", "reward.batch_size=16",
            "reward.micro_batch_size=4", "reward.eval_every=1000", "reward.stats_pairs=16", "reward.log_every=1",
            "reward.save_every=3", f"reward.data={data}", f"reward.eval_data={small_world / 'pairs_eval.jsonl'}"]
    res = _torchrun("reward", "--out", str(tmp_path / "whole"), *args)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun("reward", "--out", str(tmp_path / "two"), *args, dies_after=10)  # 2 passes a step
    assert res.returncode != 0 and not (tmp_path / "two" / "reward").exists()
    ckpts = tmp_path / "two" / "logs" / "reward" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000003", "step-000004"]
    assert (ckpts / "step-000003" / "sharded" / ".metadata").is_file()  # every process's shards, no whole copy
    assert not list(ckpts.glob("step-000003/*.safetensors"))
    shutil.rmtree(ckpts / "step-000004")  # the epoch's end: resume from the middle of the epoch
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    res = _torchrun("reward", "--out", str(tmp_path / "two"), *args)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun("reward", "--out", str(tmp_path / "one"), *args, nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]

    def losses(run: str) -> list[tuple[int, float]]:
        rows = (tmp_path / run / "logs" / "reward" / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, rows) if "loss" in r]

    whole = _weights(tmp_path / "whole" / "reward")
    for run, tol in (("two", 0.0), ("one", 1e-4)):
        assert [s for s, _ in losses(run)] == list(range(1, 9))
        assert max(abs(x - y) for (_, x), (_, y) in zip(losses(run), losses("whole"))) <= tol, run
        resumed = _weights(tmp_path / run / "reward")
        assert resumed.keys() == whole.keys()
        assert max((resumed[k] - whole[k]).abs().max().item() for k in whole) <= tol, run


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
    assert f"run 'direct-rlhf reward --out {tmp_path / 'run'} " in lines[0] and lines[0].endswith("first (under the same launcher, or one process)")
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
    weights) and, like reward and ppo, prints its result line and logs what it does from one
    process, not from each."""
    res = _torchrun("sft", "--out", str(tmp_path), *MICRO, f"model.base={tiny_base}", "sft.batch_size=8",
                    f"sft.data={small_world / 'pairs_train.jsonl'}", quiet=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("sft model: ") == 1, res.stdout
    assert res.stderr.count("sft model: fine-tuning ") == 1, res.stderr[-3000:]
    assert "broadcast_buffers" not in res.stderr  # torch 2.13's deprecation, for the switch we now name otherwise


if __name__ == "__main__":  # a run killed on purpose: `test_processes.py N ARGS` (see `_torchrun`)
    import direct_rlhf.train.reward as reward_mod

    calls, real = [0], reward_mod.pair_loss

    def dies_after_n(*args, **kwargs):
        calls[0] += 1
        if calls[0] > int(sys.argv[1]):
            os._exit(3)  # as a kill: nothing cleaned up, nothing saved
        return real(*args, **kwargs)

    reward_mod.pair_loss = dies_after_n
    sys.exit(main(sys.argv[2:]))


WAITER = """
import sys, time
import torch.distributed as dist
from direct_rlhf.train import sharding

sharding.init_processes(float(sys.argv[1]))
if dist.get_rank() == 1:
    time.sleep(8)  # the first process waits for this one at the barrier
dist.barrier()
print("through", flush=True)
"""


def test_model_process_timeout_min_is_how_long_a_process_waits_for_the_others(tmp_path):
    """The balance guard evaluates on the first process while the others wait at a collective, which
    torch gives up on after its own timeout (10 min under NCCL): model.process_timeout_min sets it.
    3 s: the wait for a process 8 s late stops the run; 1 min: both go through."""
    import time

    worker = tmp_path / "waiter.py"
    worker.write_text(WAITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    start = time.perf_counter()
    short = torchrun(2, [str(worker), "0.05"], env, timeout=120)
    assert short.returncode != 0 and "through" not in short.stdout and time.perf_counter() - start < 60
    long = torchrun(2, [str(worker), "1"], env, timeout=120)
    assert long.returncode == 0 and long.stdout.count("through") == 2, long.stderr[-2000:]

