"""SFT data parallel over two real processes on the CPU (torchrun over gloo), under both
`model.strategy` settings: `ddp` (whole model in each process, gradients averaged) and `fsdp`
(PyTorch FSDP2, train/sharding.py). Two processes must compute what one does on the full batch,
a sharded (DCP) checkpoint must resume, on 1 or 2 processes, into the uninterrupted run, and the
finished model must be one plain Hugging Face folder.

This file is also the worker torchrun starts (`python -m torch.distributed.run ... test_sharding.py
<json>`): it trains a tiny Llama with `train_sft` on a fixed set of pairs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun

STEPS = 4  # 32 pairs, global batch 8, one epoch
TOL = 1e-4


def _pairs():
    import random

    from direct_rlhf.data.preferences import Pair
    from tiny_eval_models import WORDS

    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [Pair(prompt=f"\n\nHuman: {words(3 + i % 5)}\n\nAssistant:", chosen=f" {words(2 + i % 7)}", rejected=" no")
            for i in range(32)]


def _worker(args: dict) -> None:
    from direct_rlhf.config import load_config
    from direct_rlhf.train.sft import train_sft

    cfg = load_config(None, ["sft.batch_size=8", "sft.epochs=1", "sft.lr=5e-3", "sft.warmup_steps=1",
                             "sft.log_every=1", f"sft.micro_batch_size={args.get('micro', 0)}",
                             f"model.strategy={args['strategy']}", *args.get("extra", [])])
    out = Path(args["out"])
    train_sft(cfg, args["base"], _pairs(), out / "sft", out / "logs", key=args.get("key", "test"), progress=False,
              checkpoints=out / "checkpoints", save_every=args.get("save_every", 0),
              resume_from=Path(args["resume"]) if args.get("resume") else None)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama (2 layers, untied head) and the tests' BPE tokenizer, saved as a model folder."""
    from tiny_eval_models import tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("base") / "base"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(nproc: int, **args) -> Path:
    cmd = [__file__, json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in args.items()})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    res = torchrun(nproc, cmd, env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(args["out"])


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "logs" / "metrics.jsonl").read_text().splitlines())}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "sft" / "model.safetensors"))


def _assert_close(a: Path, b: Path, steps=range(1, STEPS + 1)) -> None:
    la, lb = _losses(a), _losses(b)
    assert all(abs(la[s] - lb[s]) <= TOL for s in steps), (la, lb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= TOL, worst


@pytest.fixture(scope="module")
def one_process(base, tmp_path_factory):
    """The reference: one process, the whole global batch in one pass."""
    return _run(1, base=base, out=tmp_path_factory.mktemp("one"), strategy="ddp")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one_process_on_the_full_batch(base, one_process, tmp_path, strategy):
    """Each process takes 4 of the 8 rows, in 2 micro-batches of 2: same losses and weights (1e-4).
    The weights must have moved, or equal weights would prove nothing."""
    two = _run(2, base=base, out=tmp_path, strategy=strategy, micro=2)
    _assert_close(one_process, two)
    from safetensors.torch import load_file

    start = load_file(str(base / "model.safetensors"))
    assert max((_weights(two)[k] - start[k]).abs().max().item() for k in start) > 1e-3
    assert json.loads((two / "sft" / "run_info.json").read_text())["processes"] == 2


def test_a_sharded_checkpoint_resumes_on_one_or_two_processes_as_the_uninterrupted_run(base, tmp_path):
    """fsdp on 2 processes, DCP checkpoint at step 2; resuming it on 2 processes and on 1 process
    (resharded), both to step 4, equals the run that never stopped."""
    whole = _run(2, base=base, out=tmp_path / "whole", strategy="fsdp", micro=2, save_every=2)
    ckpt = whole / "checkpoints" / "step-000002"
    assert (ckpt / ".metadata").is_file() and not list((whole / "checkpoints").glob(".*.tmp"))
    for nproc in (2, 1):
        resumed = _run(nproc, base=base, out=tmp_path / f"resumed{nproc}", strategy="fsdp", resume=ckpt)
        assert sorted(_losses(resumed)) == [3, 4]  # only the steps after the checkpoint were trained
        _assert_close(whole, resumed, steps=[3, 4])


def test_a_killed_run_goes_on_from_its_newest_checkpoint_by_itself_and_another_runs_are_dropped(base, tmp_path):
    """What `direct-rlhf sft` does (sft.save_every): a start that finds a checkpoint of the same
    inputs (key) continues it, with no --resume, to the uninterrupted run's model; one of other
    inputs is removed and training starts afresh."""
    import shutil

    whole = _run(2, base=base, out=tmp_path / "whole", strategy="fsdp", micro=2, save_every=2)
    for key in ("test", "other"):
        again = tmp_path / key
        shutil.copytree(whole, again)
        shutil.rmtree(again / "sft")  # as if killed after the checkpoint at step 2
        log = again / "logs" / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        log.write_text("".join(json.dumps({**r, "loss": 99.0} if r["step"] == 1 else r) + "\n" for r in rows))
        _run(2, base=base, out=again, strategy="fsdp", micro=2, save_every=2, key=key)
        losses = _losses(again)
        assert sorted(losses) == [1, 2, 3, 4]
        # continued: step 1's row is the killed run's (marked); started afresh: trained again
        assert (losses[1] == 99.0) == (key == "test"), losses
        _assert_close(whole, again, steps=[3, 4])
        assert torch.load(again / "checkpoints" / "step-000002" / "trainer.pt", weights_only=True)["key"] == key


def test_the_fsdp_model_is_one_plain_hugging_face_folder(base, one_process, tmp_path):
    """Gathered whole on the main process: transformers loads it as a LlamaForCausalLM (not an
    FSDP class), with every weight, and it scores text as the one-process model does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    two = _run(2, base=base, out=tmp_path, strategy="fsdp", micro=4)
    folder = two / "sft"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = AutoModelForCausalLM.from_pretrained(one_process / "sft").eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("\n\nHuman: hello\n\nAssistant: Paris", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-3)


def test_fsdp_with_bf16_compute_cpu_offload_and_activation_checkpointing_trains_close_to_fp32(base, one_process,
                                                                                             tmp_path):
    """model.dtype=bfloat16 under fsdp: layers compute in bf16 from fp32 master weights (the saved
    weights stay float32), with the shards offloaded and activations recomputed; losses within bf16's reach."""
    two = _run(2, base=base, out=tmp_path, strategy="fsdp", micro=2,
               extra=["model.dtype=bfloat16", "model.fsdp_cpu_offload=true", "model.gradient_checkpointing=true"])
    la, lb = _losses(one_process), _losses(two)
    gaps = [abs(la[s] - lb[s]) for s in la]
    # a tiny random model has near-zero logits, so bf16 moves the loss by ~1e-4, fp32 sharding by ~5e-7
    assert 1e-5 < max(gaps) < 0.01, (la, lb)
    assert all(w.dtype == torch.float32 for w in _weights(two).values())


def test_a_global_batch_that_does_not_divide_over_the_processes_is_a_one_line_error(monkeypatch):
    from direct_rlhf.errors import UserError
    from direct_rlhf.train import sharding

    monkeypatch.setattr(sharding, "world_size", lambda: 3)
    assert sharding.split_batch(9, "sft.batch_size") == 3
    with pytest.raises(UserError, match="sft.batch_size=8 is the global batch: it must divide by the number of "
                                        r"processes \(3\)"):
        sharding.split_batch(8, "sft.batch_size")


def test_the_new_settings_at_their_defaults_leave_every_stage_key_as_it_was():
    """model.strategy, model.fsdp_cpu_offload and sft.micro_batch_size at their defaults train as
    before they existed: left out of the stage keys, run folders made before them stay cached
    (checked against a run folder made by the previous commit); set, they are keyed."""
    from direct_rlhf.config import load_config

    settings = load_config(None, []).section_dict("model", "sft")
    assert {"strategy", "fsdp_cpu_offload"}.isdisjoint(settings["model"]) and "micro_batch_size" not in settings["sft"]
    cfg = load_config(None, ["model.strategy=fsdp", "sft.micro_batch_size=2"])
    settings = cfg.section_dict("model", "sft")
    assert settings["model"]["strategy"] == "fsdp" and settings["sft"]["micro_batch_size"] == 2
    # the stages that read it (SFT, PPO, reward and cost models) are keyed by it; the base they start from is not
    assert cfg.section_dict("model", "pretrain") == load_config(None, []).section_dict("model", "pretrain")
    assert cfg.section_dict("model", "reward")["model"]["strategy"] == "fsdp"
    # how long processes wait for each other changes no stage's key
    waiting = load_config(None, ["model.process_timeout_min=120"])
    assert waiting.section_dict("model", "ppo") == load_config(None, []).section_dict("model", "ppo")


if __name__ == "__main__":
    from direct_rlhf.train.sharding import close_processes

    _worker(json.loads(sys.argv[1]))
    close_processes()  # after the worker's models are gone, as the CLI does (gloo aborts at exit otherwise)
