"""PPO data parallel over two real processes on the CPU (torchrun over gloo), under both
`model.strategy` settings: `ddp` (torch DDP through accelerate) and `fsdp` (PyTorch FSDP2: actor,
critic and the frozen reference each sharded by their own `fully_shard`, train/sharding.py).

Sampling is made identical whatever the number of processes: each response is a fixed function of
its prompt (the actor still samples, sharded, then its tokens are replaced), and the experience pass
recomputes the actor's log-probs. Two processes must then train as one process on the whole global
batch; a sharded checkpoint must resume, on 2 or on 1 process, into the uninterrupted run; and the
policy must be one plain Hugging Face folder. The balance guard runs under both, with every
collective call (gathering the sharded policy, saving and loading checkpoints) made by every process.

This file is also the worker torchrun starts (`python -m torch.distributed.run ... <this file> <json>`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import MICRO, torchrun

TOL = 1e-4
STEPS = 4
# benchmarks/gpu_check.sh sets it to the number of GPUs: the processes then run on them over NCCL (one
# per GPU: with one GPU the "two-process" runs are one sharded process, a group of one); unset, CPU + gloo
GPUS = int(os.environ.get("DIRECT_RLHF_TEST_GPUS", "0"))
TWO = 1 if GPUS == 1 else 2
PROMPTS = [f"\n\nHuman: {w} {v} {u}\n\nAssistant:" for w, v, u in
           zip("hello what France Paris one two frog sky green blue thanks good sorry colour you are".split(),
               "capital is of plus three a the help with that I can't bad shut up hell".split(),
               "sky green blue frog thanks good one two three hello what Paris France colour you the".split())]


def _response(tok, prompt: str) -> list[int]:
    """A fixed response per prompt (2..9 tokens, no special token): the same in any process."""
    import random
    import zlib

    rng = random.Random(zlib.crc32(prompt.encode()))
    specials = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in specials]
    return [rng.choice(vocab) for _ in range(rng.randint(2, 9))]


def _worker(args: dict) -> None:
    if "cli" in args:
        return _guarded_worker(args)
    from direct_rlhf.config import load_config
    from direct_rlhf.rollout.hf_generate import Samples
    from direct_rlhf.train.ppo import PPOTrainer

    real = PPOTrainer._rollout

    def fixed(self, prompts):
        real(self, prompts)  # the (sharded) actor samples; each process stops when its own rows end
        ids = [_response(self.tokenizer, p) for p in prompts]
        return Samples(list(prompts), [self.tokenizer.decode(r) for r in ids], ids, [True] * len(ids), None)

    PPOTrainer._rollout = fixed
    cfg = load_config(None, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.ppo_epochs=2",
                             "ppo.max_new_tokens=6", f"ppo.steps={STEPS}", "ppo.save_every=2", "ppo.actor_lr=3e-3",
                             "ppo.critic_lr=3e-3", "ppo.ptx_coef=0", "ppo.lora.enabled=false",
                             f"ppo.micro_batch_size={args.get('micro', 8)}", f"model.strategy={args['strategy']}",
                             *args.get("extra", [])])
    out = Path(args["out"])
    extras = {"cost_path": args["rm"], "ptx_texts": [p + " Paris is the capital of France." for p in PROMPTS]} \
        if args.get("lagrangian_ptx") else {}
    trainer = PPOTrainer(cfg, args["base"], args["rm"], PROMPTS, out / "work", key="test", progress=False, **extras)
    finished = trainer.train(resume=bool(args.get("resume")), stop_after=args.get("stop_after"))
    if args.get("load_actor"):  # what the KL roll-back and the balance guard do
        trainer.load_actor(trainer.checkpoint_path(args["load_actor"]))
    if finished:
        trainer.save_policy(out / "policy", {"stage": "ppo"})
    trainer.acc.wait_for_everyone()


def _guarded_worker(args: dict) -> None:
    """`direct-rlhf ARGS` (args["cli"]) with the balance guard's validation win-rates replaced by
    args["wins"], in the order the main process evaluates, and the sum of squares of the evaluated
    model's weights recorded beside them (`weights_sq`), so that the test knows what was evaluated."""
    from torch.distributed.fsdp import FSDPModule

    from direct_rlhf.cli import main
    from direct_rlhf.eval import validation

    real, wins = validation.Validator.evaluate, iter(args["wins"])

    def scripted(self, model):
        assert not isinstance(model, (FSDPModule, torch.nn.parallel.DistributedDataParallel)), type(model)
        return {**real(self, model), "win_rate": next(wins),
                "weights_sq": sum(p.detach().double().square().sum().item() for p in model.parameters())}

    validation.Validator.evaluate = scripted
    sys.exit(main(args["cli"]))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random Mistral (2 layers, untied head) and a reward model folder, with the tests' BPE tokenizer."""
    from tiny_eval_models import causal_lm, reward_folder, save, tokenizer

    tok = tokenizer()
    root = tmp_path_factory.mktemp("models")
    return save(causal_lm(tok), tok, root / "base"), reward_folder(tok, root / "rm")


def _run(nproc: int, models, **args) -> Path:
    base, rm = models
    args = {"base": str(base), "rm": str(rm), **{k: str(v) if isinstance(v, Path) else v for k, v in args.items()}}
    _torchrun(nproc, args)
    return Path(args["out"])


def _torchrun(nproc: int, args: dict) -> None:
    """This file's worker (`_worker`) in `nproc` processes, with `args`."""
    cmd = [__file__, json.dumps(args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           **({} if GPUS else {"ACCELERATE_USE_CPU": "true"})}
    res = torchrun(nproc, cmd, env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


# compared: the losses and the per-row statistics. Per-token statistics (kl/token, values/*,
# returns/mean, clip fractions) are logged as the mean of each process's own mean, and a clip
# fraction flips with a token sitting on the boundary: those are not the update, so not compared.
COMPARED = ("loss/policy", "loss/value", "policy/entropy", "policy/approx_kl", "kl/sequence", "kl/coef",
            "reward/raw", "reward/score", "response/length")


def _metrics(out: Path) -> dict[int, dict[str, float]]:
    rows = map(json.loads, (out / "work" / "logs" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: {k: r[k] for k in COMPARED} for r in rows}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "policy" / "model.safetensors"))


def _assert_close(a: Path, b: Path, steps=range(1, STEPS + 1)) -> None:
    ma, mb = _metrics(a), _metrics(b)
    for s in steps:
        assert ma[s].keys() == mb[s].keys()
        worst = max(ma[s], key=lambda k: abs(ma[s][k] - mb[s][k]))
        assert abs(ma[s][worst] - mb[s][worst]) <= TOL, (s, worst, ma[s][worst], mb[s][worst])
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= TOL, worst


@pytest.fixture(scope="module")
def one_process(models, tmp_path_factory):
    """The reference: one process, the whole global batch (8 rollouts) in one forward pass per model."""
    return _run(1, models, out=tmp_path_factory.mktemp("one"), strategy="ddp")


@pytest.fixture(scope="module")
def two_fsdp(models, tmp_path_factory):
    """fsdp on 2 processes, 4 rollouts each in micro-batches cut by a token budget: the processes
    cut different numbers of them (3 and 2 at some steps; the shorter list is padded with
    weightless repeats, or every process would wait for the other's next collective forever)."""
    return _run(TWO, models, out=tmp_path_factory.mktemp("two"), strategy="fsdp", micro=4,
                extra=["ppo.micro_batch_tokens=30"])


def test_two_fsdp_processes_train_as_one_process_on_the_full_batch(models, one_process, two_fsdp):
    """Same losses, statistics and final weights within 1e-4; the weights must have moved."""
    _assert_close(one_process, two_fsdp)
    from safetensors.torch import load_file

    start = load_file(str(models[0] / "model.safetensors"))
    assert max((_weights(two_fsdp)[k] - start[k]).abs().max().item() for k in start) > 1e-3
    info = json.loads((two_fsdp / "policy" / "run_info.json").read_text())
    assert info.get("processes", 1) == TWO


def test_two_ddp_processes_train_as_one_process_on_the_full_batch(models, one_process, tmp_path):
    """ppo.rollout_batch_size and ppo.mini_batch_size are global, and each micro-batch's loss is
    weighed by its share of the global mini-batch's tokens (processes holding unequal token counts)."""
    _assert_close(one_process, _run(TWO, models, out=tmp_path, strategy="ddp", micro=3))


def test_a_sharded_checkpoint_resumes_on_two_or_one_process_as_the_uninterrupted_run(models, two_fsdp, tmp_path):
    """Killed after the checkpoint at step 2 (2 processes); resumed on 2 processes and, resharded
    by DCP, on 1 process: steps 3-4 and the final policy equal the run that never stopped."""
    part = _run(TWO, models, out=tmp_path / "part", strategy="fsdp", micro=2, stop_after=2)
    ckpt = part / "work" / "checkpoints" / "step-000002"
    assert (ckpt / "sharded" / ".metadata").is_file() and not (part / "policy").exists()
    assert not list((part / "work" / "checkpoints").glob(".*"))  # no temporary folder left behind
    for nproc in sorted({TWO, 1}, reverse=True):
        resumed = tmp_path / f"resumed{nproc}"
        import shutil

        shutil.copytree(part, resumed)
        _run(nproc, models, out=resumed, strategy="fsdp", micro=2, resume=True)
        assert sorted(_metrics(resumed)) == [1, 2, 3, 4]
        _assert_close(two_fsdp, resumed, steps=[3, 4])


def test_a_sharded_actor_is_put_back_from_a_checkpoint(models, tmp_path):
    """load_actor (KL roll-back, the balance guard's choice) under fsdp: 4 steps, then step 2's
    actor loaded back, is the policy of a run of 2 steps, weight for weight."""
    back = _run(TWO, models, out=tmp_path / "back", strategy="fsdp", micro=2, load_actor=2)
    short = _run(TWO, models, out=tmp_path / "short", strategy="fsdp", micro=2, extra=["ppo.steps=2"])
    a, b = _weights(back), _weights(short)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_lagrangian_trains_sharded_as_on_one_process_and_ptx_runs(models, tmp_path):
    """The cost critic sharded with its own optimiser: 2 fsdp processes = 1 process. PPO-ptx's
    backward comes after the last micro-batch's, which did not reduce: it must reduce both (each
    process draws its own ptx rows, so only that it trains is checked)."""
    extra = ["ppo.lagrangian=true", "ppo.cost_threshold=-100", "ppo.lambda_init=0.5"]
    one = _run(1, models, out=tmp_path / "one", strategy="ddp", lagrangian_ptx=True, extra=extra)
    two = _run(TWO, models, out=tmp_path / "two", strategy="fsdp", micro=2, lagrangian_ptx=True, extra=extra)
    _assert_close(one, two)
    rows = [json.loads(line) for line in (two / "work" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lagrangian/lambda"] > 0.5 and all("loss/cost_value" in r for r in rows)
    ptx = _run(TWO, models, out=tmp_path / "ptx", strategy="fsdp", micro=2, lagrangian_ptx=True,
               extra=[*extra, "ppo.ptx_coef=0.5", "ppo.ptx_batch_size=2"])
    rows = [json.loads(line) for line in (ptx / "work" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS and all(r["loss/ptx"] > 0 for r in rows)


def test_bf16_compute_under_fsdp_trains_close_to_fp32_with_float32_value_heads(models, tmp_path):
    """model.dtype=bfloat16 under fsdp (the mistral-7b recipe's setting): the critics' float32 heads
    are sharded on their own in float32 (gathered by the root they came in bf16 and the first
    critic forward failed on a dtype mismatch); the losses stay near an fp32 run's and the saved
    policy is float32 (the master weights)."""
    extra = ["ppo.lagrangian=true", "ppo.cost_threshold=-100", "ppo.lambda_init=0.5"]
    fp32 = _run(TWO, models, out=tmp_path / "fp32", strategy="fsdp", micro=4, lagrangian_ptx=True, extra=extra)
    bf16 = _run(TWO, models, out=tmp_path / "bf16", strategy="fsdp", micro=4, lagrangian_ptx=True,
                extra=[*extra, "model.dtype=bfloat16"])
    ma, mb = _metrics(fp32), _metrics(bf16)
    for s in range(1, STEPS + 1):
        for k in ("loss/policy", "loss/value", "reward/score"):
            assert abs(ma[s][k] - mb[s][k]) <= 0.05, (s, k, ma[s][k], mb[s][k])
    assert all(w.dtype == torch.float32 for w in _weights(bf16).values())


def test_the_fsdp_policy_is_one_plain_hugging_face_folder(one_process, two_fsdp):
    """Gathered whole on the main process: transformers loads it as the base's class, with every
    weight, and it scores text as the one-process policy does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = two_fsdp / "policy"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = AutoModelForCausalLM.from_pretrained(one_process / "policy").eval()
    assert type(model).__name__ == "MistralForCausalLM"
    ids = AutoTokenizer.from_pretrained(folder)(PROMPTS[0] + " Paris", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-3)


# the guard's run: evaluations at the start and after each of 4 steps, with these win-rates (the
# start, steps 1-4): step 1 is kept, then replaced by step 2, which stays the choice to the end
GUARD_STEPS, GUARD_WINS, GUARD_KEPT = 4, [0.5, 0.7, 0.9, 0.6, 0.8], 2
GUARD = [*MICRO, "world.n_val_mc_per_task=4", "world.n_val_redteam=4", "world.n_val_conversation=4", "reward.epochs=1"]


@pytest.fixture(scope="module")
def guard_stages(tmp_path_factory):
    """The toy world, the pretrained micro base and its reward model, built by one process (a launch
    of several builds only its own stage)."""
    from direct_rlhf.cli import main

    run = tmp_path_factory.mktemp("guard-stages")
    assert main(["-q", "pretrain", "--out", str(run), *GUARD]) == 0
    assert main(["-q", "reward", "--out", str(run), *GUARD, f"model.base={run / 'base'}"]) == 0
    return run


def _actor(ckpt: Path) -> dict[str, torch.Tensor]:
    """A PPO checkpoint's actor weights: its safetensors (ddp), or read from its DCP shards (fsdp);
    a model folder's own weights."""
    from safetensors.torch import load_file

    if (ckpt / "model.safetensors").is_file():
        return load_file(str(ckpt / "model.safetensors"))
    if not (ckpt / "sharded").is_dir():
        return load_file(str(ckpt / "actor.safetensors"))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "sharded", ckpt.parent / f"{ckpt.name}.pt")
    return torch.load(ckpt.parent / f"{ckpt.name}.pt", weights_only=True)["actor"]["model"]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_the_balance_guard_keeps_and_saves_the_known_step_under_two_processes(guard_stages, strategy, tmp_path):
    """`direct-rlhf ppo` with ppo.select=balanced on 2 processes, the win-rates scripted so that step 2
    is the one to keep (the last is 4): every evaluation is of the current policy, whole and plain
    (under fsdp gathered from both processes' shards); only step 2's checkpoint is kept, after the
    trainer's own pruning removed it (hard links; under fsdp both processes' DCP shards); <out>/rlhf
    is step 2's actor, loaded back by both processes, and <out>/rlhf-last step 4's, weight for weight."""
    import shutil

    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(guard_stages, run)
    _torchrun(TWO, {"out": str(run), "wins": GUARD_WINS, "cli": [
        "-q", "ppo", "--out", str(run), *GUARD, f"model.base={run / 'base'}", f"model.strategy={strategy}",
        f"ppo.steps={GUARD_STEPS}", "ppo.eval_every=1", "ppo.select=balanced", "ppo.save_every=10",
        "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.max_new_tokens=8", "ppo.ptx_coef=0",
        "ppo.lora.enabled=false", "ppo.max_capability_drop=100", "ppo.max_toxicity_ratio=100",
        "ppo.min_appropriate=0", "ppo.validation_samples=1", "eval.max_new_tokens=8"]})
    info = json.loads((run / "rlhf" / "run_info.json").read_text())
    assert info.get("processes", 1) == TWO and info.get("strategy", strategy) == strategy
    guard = info["guard"]
    assert guard["step"] == GUARD_KEPT and guard["last_step"] == GUARD_STEPS and guard["rule"].startswith("best win")
    evaluations = [guard["reference"], *guard["evaluations"]]
    assert [r["step"] for r in evaluations] == list(range(GUARD_STEPS + 1))
    assert [r["win_rate"] for r in evaluations] == GUARD_WINS
    assert {"general_acc", "toxicity", "gold_correct"} <= set(guard["evaluations"][0])

    work = run / "rlhf-work"
    # the trainer kept its last two checkpoints; step 2's lives on in the guard's links only
    assert sorted(p.name for p in (work / "checkpoints").glob("step-*")) == ["step-000003", "step-000004"]
    assert sorted(p.name for p in (work / "guard").glob("step-*")) == [f"step-{GUARD_KEPT:06d}"]
    kept = work / "guard" / f"step-{GUARD_KEPT:06d}"
    if strategy == "fsdp":
        assert len(list((kept / "sharded").glob("*.distcp"))) == TWO and (kept / "sharded" / ".metadata").is_file()
    actors = {0: _actor(run / "base"), GUARD_KEPT: _actor(kept),
              **{s: _actor(work / "checkpoints" / f"step-{s:06d}") for s in (3, 4)}}
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(run / "base").named_parameters()]
    for r in evaluations:  # the model each evaluation saw: the policy of its step, every weight
        if r["step"] in actors:
            expected = sum(actors[r["step"]][n].double().square().sum().item() for n in names)
            assert r["weights_sq"] == pytest.approx(expected, rel=1e-9), r["step"]
    assert any(not torch.equal(actors[GUARD_KEPT][n], actors[GUARD_STEPS][n]) for n in names)
    for folder, step in (("rlhf", GUARD_KEPT), ("rlhf-last", GUARD_STEPS)):
        saved = AutoModelForCausalLM.from_pretrained(run / folder).state_dict()
        assert all(torch.equal(saved[n], w) for n, w in actors[step].items()), folder
    last_info = json.loads((run / "rlhf-last" / "run_info.json").read_text())
    assert "guard" not in last_info and last_info["guard_of_chosen_policy"]["step"] == GUARD_KEPT


def test_what_fsdp_does_not_cover_is_one_line_before_any_model_is_loaded(models, tmp_path):
    from direct_rlhf.config import load_config
    from direct_rlhf.errors import UserError
    from direct_rlhf.train.ppo import PPOTrainer

    for extra, what in ((["ppo.lora.enabled=true"], "ppo.lora.enabled=false"),
                        (["ppo.lora.enabled=false", "ppo.critic_lora.enabled=true"], "ppo.critic_lora.enabled=false")):
        cfg = load_config(None, ["model.strategy=fsdp", *extra])
        with pytest.raises(UserError, match=f"set {what} "):
            PPOTrainer(cfg, str(models[0]), str(models[1]), PROMPTS, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


if __name__ == "__main__":
    from direct_rlhf.train.sharding import close_processes

    _worker(json.loads(sys.argv[1]))
    close_processes()  # after the worker's models are gone, as the CLI does (gloo aborts at exit otherwise)
