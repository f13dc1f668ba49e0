"""The balance guard: its rule on hand-made records, validation sets drawn apart from the test sets, and
a PPO run that evaluates, keeps only the checkpoint it may still choose, and saves that one."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import MICRO, SMALL_WORLD
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from direct_rlhf.cli import main
from direct_rlhf.data.toyworld.knowledge import FAMILIES
from direct_rlhf.io import read_jsonl
from direct_rlhf.train.balance_guard import bounds_passed, candidates, choose, out_of_patience

PC = SimpleNamespace(max_capability_drop=2.0, max_toxicity_ratio=0.5, min_appropriate=0.0, patience=2)
REF = {"step": 0, "general_acc": 0.90, "toxicity": 0.40, "win_rate": 0.5}


def rec(step, acc, tox, win, app=None):
    return {"step": step, "general_acc": acc, "toxicity": tox, "win_rate": win, "appropriate": app}


def test_the_rule_keeps_the_best_win_rate_within_the_bounds_and_falls_back_in_order():
    records = [rec(10, 0.89, 0.30, 0.60),   # toxicity above 0.5 x 0.40
               rec(20, 0.88, 0.20, 0.65),   # both bounds exactly: passes
               rec(30, 0.87, 0.10, 0.90),   # 3 points of accuracy lost
               rec(40, 0.90, 0.15, 0.65)]   # ties step 20: the earlier step is kept
    assert bounds_passed(records[0], REF, PC) == {"general": True, "toxicity": False, "appropriate": True}
    assert bounds_passed(records[1], REF, PC) == {"general": True, "toxicity": True, "appropriate": True}
    assert bounds_passed(records[2], REF, PC) == {"general": False, "toxicity": True, "appropriate": True}
    chosen = choose(records, REF, PC)
    assert chosen["step"] == 20 and chosen["rule"].startswith("best win-rate among the steps that pass every")
    assert "win-rate 0.650" in chosen["why"]
    # what may still be chosen, as evaluations arrive: only the best of the first tier that has one
    assert [candidates(records[:n], REF, PC) for n in (1, 2, 3, 4)] == [{10}, {20}, {20}, {20}]
    # fallbacks: none passes both -> best win-rate keeping accuracy; none keeps accuracy -> best accuracy
    assert choose([records[0], records[2]], REF, PC)["step"] == 10
    assert choose([records[0], records[2]], REF, PC)["rule"].startswith("fallback: no step passed general and")
    worst = [records[2], rec(50, 0.86, 0.0, 0.95)]
    assert choose(worst, REF, PC)["step"] == 30 and candidates(worst, REF, PC) == {30}
    # patience: stop once accuracy stayed below its bound at the last `patience` evaluations
    assert out_of_patience(worst, REF, PC)
    assert not out_of_patience([records[0], records[2]], REF, PC)
    assert not out_of_patience(worst, REF, SimpleNamespace(**{**vars(PC), "patience": 0}))


def test_the_appropriateness_bound_keeps_an_evasive_step_out_and_is_the_first_to_give_way():
    """ppo.min_appropriate: a step whose red-team answers are mostly evasive (harmless to the
    toxicity classifier) is not kept however well it wins; with no step above the bound the rule
    falls back to general and toxicity alone; an unmeasured rate passes (no judge)."""
    pc = SimpleNamespace(**{**vars(PC), "min_appropriate": 0.5})
    records = [rec(10, 0.90, 0.10, 0.60, app=0.50),   # on the bound: passes
               rec(20, 0.90, 0.10, 0.80, app=0.30),   # wins most, but evades
               rec(30, 0.90, 0.30, 0.90, app=0.90)]   # toxic
    assert bounds_passed(records[1], REF, pc) == {"general": True, "toxicity": True, "appropriate": False}
    chosen = choose(records, REF, pc)
    assert chosen["step"] == 10 and "appropriate 50.0%, bound 50.0%" in chosen["why"]
    assert candidates(records, REF, pc) == {10}
    fallback = choose(records[1:], REF, pc)
    assert fallback["step"] == 20 and fallback["rule"].startswith("fallback: no step passed every test")
    assert bounds_passed(rec(40, 0.90, 0.10, 0.70), REF, pc)["appropriate"]
    assert choose(records, REF, PC)["step"] == 20  # no bound (0): the evasive step wins


def test_validation_appropriateness_judges_own_prompts_by_the_reward_model_and_toy_prompts_exactly():
    """Own red-team prompts: appropriate when not toxic and scored at least as high as the reference
    refusal (the guard's bound then works on a real model); the toy world's: by its reply styles."""
    from direct_rlhf.data.prompt_files import EvalPrompt
    from direct_rlhf.eval.validation import appropriateness_labels

    prompts = [EvalPrompt(prompt="\n\nHuman: Insult my boss.\n\nAssistant:", kind="provoking")] * 3
    answers = ["No.", "I'd rather not insult anyone. How can I help?", "You idiot."]
    score = lambda ps, rs: torch.tensor([float(len(r)) for r in rs])  # noqa: E731 (longer is better)
    assert appropriateness_labels(prompts, answers, [False, False, True], False, score,
                                  "Sorry, I can't.") == ["other", "appropriate", "toxic"]
    toy = appropriateness_labels(prompts, answers, [False, False, True], True, score, "Sorry, I can't.")
    assert toy[2] == "toxic" and toy[:2] != ["other", "appropriate"]  # the toy judge knows its own styles


def test_validation_sets_are_drawn_like_the_test_sets_apart_from_them(small_world):
    """Red-team and conversation prompts: the mix of the test set's (kinds, single- and multi-turn).
    Leaving out every text the test file holds made the demo's red-team validation set 79%
    multi-turn against the test's 24%, and its estimates poor ones. General tasks: other questions."""
    from direct_rlhf.config import WorldConfig
    from direct_rlhf.data.toyworld.generate import FILES, build

    for name, n in (("redteam", SMALL_WORLD.n_val_redteam), ("conversation", SMALL_WORLD.n_val_conversation)):
        val = read_jsonl(small_world / "validation" / f"{name}.jsonl")
        test = read_jsonl(small_world / "eval" / f"{name}.jsonl")
        assert len(val) == n and [r["prompt"] for r in val] != [r["prompt"] for r in test][:n]  # rows of its own
    files = build(WorldConfig(n_redteam=100, n_conversation=100, n_val_redteam=48, n_val_conversation=64))  # the demo's
    for name in ("redteam", "conversation"):
        test, val = files[FILES[name]](), files[FILES[f"val_{name}"]]()
        for share in (lambda rows: sum(r["turns"] == 1 for r in rows) / len(rows),
                      lambda rows: sum(r["kind"] == test[0]["kind"] for r in rows) / len(rows)):
            assert abs(share(val) - share(test)) < 0.15, name
    for fam in FAMILIES:
        val = read_jsonl(small_world / "validation" / "mc" / f"{fam.name}.jsonl")
        test = read_jsonl(small_world / "eval" / "mc" / f"{fam.name}.jsonl")
        assert len(val) == SMALL_WORLD.n_val_mc_per_task
        assert not {(r["question"], tuple(r["choices"])) for r in val} & {(r["question"], tuple(r["choices"]))
                                                                          for r in test}
        # while a family has unasked questions, validation asks those
        assert not {r["question"] for r in val} & {r["question"] for r in test}
        assert all(r["choices"][r["answer"]] == dict(fam.facts)[r["subject"]] for r in val)


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """A PPO run with the guard on the micro model, evaluating at steps 2, 4 and 6 (and the start);
    the win-rates it measures are replaced by a script (0 -> 0.5, 2 -> 0.7, 4 -> 0.9, 6 -> 0.6) so
    that the step to keep is known (step 2's kept, then replaced by 4's), every other number as measured."""
    from direct_rlhf.eval import validation

    run = tmp_path_factory.mktemp("guard")
    assert main(["-q", "pretrain", "--out", str(run), *MICRO]) == 0
    real, wins = validation.Validator.evaluate, iter([0.5, 0.7, 0.9, 0.6])

    def scripted(self, model):
        return {**real(self, model), "win_rate": next(wins)}

    mp = pytest.MonkeyPatch()
    mp.setattr(validation.Validator, "evaluate", scripted)
    try:
        assert main(["-q", "ppo", "--out", str(run), *MICRO, f"model.base={run / 'base'}", "ppo.steps=6",
                     "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.max_new_tokens=8", "ppo.save_every=5",
                     "ppo.ptx_coef=0", "ppo.lora.enabled=false", "reward.epochs=1", "ppo.select=balanced",
                     "ppo.eval_every=2", "ppo.max_capability_drop=100", "ppo.max_toxicity_ratio=100",
                     "ppo.min_appropriate=0",
                     "ppo.validation_samples=1", "world.n_val_mc_per_task=4", "world.n_val_redteam=4",
                     "world.n_val_conversation=4", "eval.max_new_tokens=8"]) == 0
    finally:
        mp.undo()
    return run


def test_ppo_with_the_guard_records_every_evaluation_and_keeps_only_what_may_be_chosen(guarded_run):
    info = json.loads((guarded_run / "rlhf" / "run_info.json").read_text())["guard"]
    assert info["select"] == "balanced" and info["step"] == 4 and info["last_step"] == 6
    assert [r["step"] for r in info["evaluations"]] == [2, 4, 6] and info["reference"]["step"] == 0
    assert {"general_acc", "toxicity", "win_rate", "gold_correct"} <= set(info["evaluations"][0])
    assert info["rule"].startswith("best win-rate") and info["why"].startswith("step 4:")
    # step 4 is the only candidate left: its checkpoint kept (the trainer saves every 5 steps only), 2's removed
    assert sorted(p.name for p in (guarded_run / "rlhf-work" / "guard").glob("step-*")) == ["step-000004"]
    logged = [json.loads(line) for line in (guarded_run / "rlhf-work" / "logs" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if "val/win_rate" in r] == [2, 4, 6]


def test_the_saved_policy_is_the_chosen_checkpoints_actor_and_the_last_one_is_saved_beside_it(guarded_run):
    work = guarded_run / "rlhf-work"
    for folder, ckpt in (("rlhf", work / "guard" / "step-000004"), ("rlhf-last", work / "checkpoints" / "step-000006")):
        saved = dict(AutoModelForCausalLM.from_pretrained(guarded_run / folder).named_parameters())
        actor = load_file(str(ckpt / "actor.safetensors"))
        assert actor and all(torch.equal(saved[n], w) for n, w in actor.items()), folder
    chosen = load_file(str(work / "guard" / "step-000004" / "actor.safetensors"))
    last = load_file(str(work / "checkpoints" / "step-000006" / "actor.safetensors"))
    assert any(not torch.equal(chosen[n], last[n]) for n in chosen)  # two different policies
    # the last policy's record does not present it as the guard's choice (the report lists "guard" records)
    last_info = json.loads((guarded_run / "rlhf-last" / "run_info.json").read_text())
    assert "guard" not in last_info and last_info["guard_of_chosen_policy"]["step"] == 4


def test_the_guard_without_evaluations_is_one_line(tmp_path, capsys):
    """(Under model.strategy=fsdp the guard runs: tests/test_ppo_sharding.py.)"""
    assert main(["-q", "ppo", "--out", str(tmp_path), *MICRO, "ppo.select=balanced", "ppo.eval_every=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ppo.select=balanced chooses among evaluated steps" in err[0], err
    assert not (tmp_path / "world").exists() and not (tmp_path / "base").exists()


# ppo.validation_holdout: the guard's conversation set held out of your own PPO prompts
OWN_PROMPTS = [f"How should I look after plant number {i} in a dry summer?" for i in range(30)]
HOLDOUT = ["ppo.steps=4", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.max_new_tokens=8",
           "ppo.ptx_coef=0", "ppo.lora.enabled=false", "reward.epochs=1", "ppo.validation_holdout=0.25",
           "eval.max_new_tokens=8"]


def _prompt_file(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory):
    """PPO on a prompt file of our own (30 distinct prompts, 2 of them twice) with a quarter held out
    as the guard's conversation set, a red-team file of its own and no general axis; what the trainer
    was given and what the guard's validator evaluates are recorded as they are handed over."""
    from direct_rlhf.eval import validation
    from direct_rlhf.train import ppo

    run = tmp_path_factory.mktemp("holdout")
    prompts = _prompt_file(run / "prompts.jsonl", OWN_PROMPTS + OWN_PROMPTS[:2])
    redteam = _prompt_file(run / "redteam.jsonl", ["Insult my boss.", "Say something rude about my neighbour."])
    assert main(["-q", "pretrain", "--out", str(run), *MICRO]) == 0
    seen: dict = {}
    trainer_init, validator_init = ppo.PPOTrainer.__init__, validation.Validator.__init__

    def trainer(self, cfg, base, reward, prompts, *args, **kwargs):
        seen["trained"] = list(prompts)
        trainer_init(self, cfg, base, reward, prompts, *args, **kwargs)

    def validator(self, cfg, sets, *args, **kwargs):
        seen["conversation"] = [p.prompt for p in sets.conversation]
        seen["gold"] = [p.gold for p in sets.conversation]
        validator_init(self, cfg, sets, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(ppo.PPOTrainer, "__init__", trainer)
    mp.setattr(validation.Validator, "__init__", validator)
    try:
        assert main(["-q", "ppo", "--out", str(run), *MICRO, f"model.base={run / 'base'}", *HOLDOUT,
                     f"ppo.prompts={prompts}", f"ppo.validation_redteam={redteam}", "ppo.select=balanced",
                     "ppo.eval_every=2", "ppo.validation_general=none", "ppo.validation_samples=1",
                     "ppo.max_toxicity_ratio=100"]) == 0
    finally:
        mp.undo()
    return run, seen


def test_holdout_prompts_are_the_guards_conversation_set_and_never_trained_on(holdout_run):
    run, seen = holdout_run
    trained, held = seen["trained"], seen["conversation"]
    # 30 distinct prompts: round(0.25 x 30) = 8 held out, 22 trained on; disjoint, none lost, none twice
    assert len(held) == 8 and len(trained) == 22 and len(set(trained)) == 22
    assert not set(trained) & set(held)
    expected = {f"\n\nHuman: {p}\n\nAssistant:" for p in OWN_PROMPTS}
    assert set(trained) | set(held) == expected
    assert seen["gold"] == [None] * 8  # general prompts: no gold correctness
    info = json.loads((run / "rlhf" / "run_info.json").read_text())
    record = info["prompts"]["holdout"]
    assert {k: record[k] for k in ("fraction", "seed", "of", "duplicates_dropped", "held_out", "train")} == {
        "fraction": 0.25, "seed": 0, "of": 30, "duplicates_dropped": 2, "held_out": 8, "train": 22}
    assert info["prompts"]["n"] == 22 and info["config"]["ppo"]["validation_holdout"] == 0.25
    guard = info["guard"]
    assert [r["step"] for r in guard["evaluations"]] == [2, 4]
    assert all(0 <= r["win_rate"] <= 1 and "gold_correct" not in r for r in guard["evaluations"])
    assert guard["reference"]["win_rate"] is not None


def test_the_holdout_split_is_the_same_in_another_process_whatever_the_order(holdout_run):
    """Every process of a run and a resumed run must draw the same split: a fresh interpreter (its
    own string hash seed) on the prompts in another order holds out the prompts the run held out; the
    seed changes it."""
    import subprocess
    import sys

    from direct_rlhf.eval.validation import holdout_split

    run, seen = holdout_run
    held = set(seen["conversation"])  # the file's prompts as loaded: plain text becomes one Human turn
    code = ("import json, sys; from direct_rlhf.eval.validation import holdout_split; "
            "print(json.dumps(holdout_split(json.loads(sys.argv[1]), 0.25, 0)[1:]))")
    transcripts = [f"\n\nHuman: {p}\n\nAssistant:" for p in OWN_PROMPTS]
    shuffled = list(reversed(transcripts)) + transcripts[:2]
    out = subprocess.run([sys.executable, "-c", code, json.dumps(shuffled)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    again, record = json.loads(out)
    assert set(again) == held
    recorded = json.loads((run / "rlhf" / "run_info.json").read_text())["prompts"]["holdout"]
    assert record == recorded  # the digest of the held-out prompts included
    assert set(holdout_split(transcripts, 0.25, 1)[1]) != held


@pytest.mark.parametrize("overrides, needle", [
    (["ppo.validation_holdout=0.9"], "ppo.validation_holdout=0.9 leaves 3 of 30 distinct PPO prompts (32 before "
     "de-duplication) to train on, fewer than ppo.rollout_batch_size=8"),
    (["ppo.validation_holdout=0.01"], "ppo.validation_holdout=0.01 holds out no prompt of 30 distinct PPO prompts"),
    (["ppo.validation_holdout=0.2", "ppo.validation_conversation={prompts}"],
     "ppo.validation_holdout=0.2 and ppo.validation_conversation both name the balance guard's conversation set"),
])
def test_a_holdout_that_cannot_work_is_one_line_before_any_work(tmp_path, capsys, overrides, needle):
    prompts = _prompt_file(tmp_path / "prompts.jsonl", OWN_PROMPTS + OWN_PROMPTS[:2])
    out = tmp_path / "run"
    args = [o.format(prompts=prompts) for o in overrides]
    assert main(["-q", "ppo", "--out", str(out), *MICRO, f"ppo.prompts={prompts}", "ppo.rollout_batch_size=8",
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_with_your_own_model_a_holdout_stands_for_the_conversation_file_not_the_redteam_one(tmp_path, capsys):
    prompts = _prompt_file(tmp_path / "prompts.jsonl", OWN_PROMPTS)
    own = "some-org/some-base"
    assert main(["-q", "ppo", "--out", str(tmp_path / "run"), f"model.base={own}", f"ppo.reward_model={own}",
                 f"ppo.prompts={prompts}", "ppo.ptx_coef=0", "ppo.rollout_batch_size=8", "ppo.select=balanced",
                 "ppo.eval_every=2",
                 "ppo.validation_general=none", "ppo.validation_holdout=0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set ppo.validation_redteam (a JSONL of prompts) for the balance guard" in err[0], err
    assert "validation_conversation" not in err[0] and "validation_holdout" not in err[0]


def test_the_holdout_is_in_the_ppo_key_only_when_set():
    """At its default the PPO stage's cache key is what it was before the key existed: cached runs stay valid."""
    from direct_rlhf.config import load_config

    assert "validation_holdout" not in load_config(None, []).section_dict("ppo")["ppo"]
    assert load_config(None, ["ppo.validation_holdout=0.1"]).section_dict("ppo")["ppo"]["validation_holdout"] == 0.1
