"""The main job end to end: `demo --quick` writes the report for base, SFT and direct RLHF."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from direct_rlhf.cli import main

STAGES = ("base", "reward", "sft", "rlhf", "sft_rlhf")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["-q", "demo", "--quick", "--with-sft-rlhf", "--out", str(out)]) == 0
    return out


def test_quick_demo_writes_results_and_report_for_every_model(quick_run):
    results = json.loads((quick_run / "eval" / "results.json").read_text())
    # quick.yaml keeps the balance guard's choice (ppo.select=balanced) and evaluates the last step's policy too
    assert set(results["models"]) == {"base", "sft", "rlhf", "rlhf-last", "sft_rlhf"}
    for axis in ("general", "harmlessness", "conversation"):
        assert results[axis]
    assert len(results["general"]["per_model"]["rlhf"]) >= 11
    html = (quick_run / "eval" / "report.html").read_text()
    assert "<img" in html and "rlhf" in html
    assert 'id="guard"' in html and (quick_run / "eval" / "guard_trajectory.png").is_file()
    summary = json.loads((quick_run / "summary.json").read_text())
    table = summary["table"]
    for label, row in table.items():
        if label != "mean reward (RM)":
            assert all(0.0 <= row[m]["mean"] <= 1.0 for m in results["models"]), label
    assert table["win-rate vs base (RM)"]["base"]["mean"] == 0.5
    # the headline numbers agree with the per-response file they were computed from
    rows = [json.loads(line) for line in (quick_run / "eval" / "responses.jsonl").read_text().splitlines()]
    harm, conv = results["harmlessness"], results["conversation"]
    tie = conv["judges"]["reward_model"]["tie_eps"]
    for m in results["models"]:
        red = [r["toxicity"] for r in rows if r["model"] == m and r["set"] == "redteam"]
        assert len(red) == harm["n_prompts"] * harm["samples_per_prompt"]
        rate = sum(t >= harm["threshold"] for t in red) / len(red)
        assert harm["per_model"][m]["toxicity_rate"] == pytest.approx(rate)
        assert table["toxicity (red-team)"][m]["mean"] == pytest.approx(rate)
    reward = {(r["model"], r["prompt_index"], r["sample"]): r["reward"] for r in rows if r["set"] == "conversation"}
    diffs = [reward["rlhf", i, j] - reward["base", i, j] for (m, i, j) in reward if m == "rlhf"]
    assert len(diffs) == conv["n_prompts"] * conv["samples_per_prompt"]
    won = sum(1.0 if d > tie else 0.5 if abs(d) <= tie else 0.0 for d in diffs) / len(diffs)
    assert table["win-rate vs base (RM)"]["rlhf"]["mean"] == pytest.approx(won)


def test_second_run_reuses_every_stage_and_evaluates_again_only_when_evaluation_changes(quick_run):
    def stamps():
        return {s: (quick_run / s / "stage.json").stat().st_mtime_ns for s in (*STAGES, "eval")}

    before = stamps()
    made = json.loads((quick_run / "summary.json").read_text())["stage_wall_s"]
    assert made["pretrain"] > 0 and set(made["seeds"]["seed-0"]) == {"reward", "sft", "rlhf", "sft_rlhf", "eval"}
    assert main(["-q", "demo", "--quick", "--with-sft-rlhf", "--out", str(quick_run)]) == 0
    assert stamps() == before
    # the cached rerun takes seconds, but the summary still says what the stages cost when made
    again = json.loads((quick_run / "summary.json").read_text())
    assert again["stage_wall_s"] == made and again["wall_s"] < made["total"]
    assert main(["-q", "demo", "--quick", "--with-sft-rlhf", "--out", str(quick_run), "eval.tie_eps=0.02"]) == 0
    after = stamps()
    assert after["eval"] != before["eval"] and all(after[s] == before[s] for s in STAGES)
    assert json.loads((quick_run / "eval" / "results.json").read_text())["config"]["eval"]["tie_eps"] == 0.02
    # `direct-rlhf eval` into the demo's evaluation folder replaces its results: its stamp goes with
    # them, or the demo would reuse another evaluation's results under its own key
    assert main(["-q", "eval", "--config", "quick", "--models", f"base={quick_run / 'base'}",
                 "--out", str(quick_run / "eval"), "eval.general=none", "eval.tie_eps=0.02"]) == 0
    assert not (quick_run / "eval" / "stage.json").exists()


def test_chat_answers_a_scripted_two_turn_conversation(quick_run, capsys):
    res = subprocess.run([sys.executable, "-m", "direct_rlhf", "chat", str(quick_run / "rlhf"), "--temperature", "0",
                          "--trust-remote-code"],  # a plain folder loads the same with it
                         input="What is the capital of France?\nAnd of Spain?\n", capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    replies = [line for line in res.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and all(r.strip() != "assistant>" for r in replies)
    for flag, value in (("--max-new-tokens", "0"), ("--temperature", "-1")):  # refused before the model loads
        assert main(["chat", str(quick_run / "rlhf"), flag, value]) == 2
        assert capsys.readouterr().err.startswith(f"direct-rlhf: error: {flag} must be")
    # a mistyped folder: one plain line, not a hub-id validation error
    assert main(["chat", str(quick_run / "rlfh")]) == 2
    assert capsys.readouterr().err.strip() == f"direct-rlhf: error: {quick_run / 'rlfh'}: model folder not found"
    assert main(["chat", "gpt2"]) == 2  # a hub id without its organisation reads as a local folder: say how to write it
    assert "a hub id is written organisation/name" in capsys.readouterr().err


def test_seeds_train_each_seed_and_judge_it_by_the_other_seeds_reward_models(quick_run, tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["-q", "demo", "--quick", "--seeds", "2", "--out", str(out), f"model.base={quick_run / 'base'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert all((out / f"seed-{s}" / stage / "stage.json").exists() for s in (0, 1) for stage in ("reward", "rlhf"))
    tox = summary["table"]["toxicity (red-team)"]["rlhf"]
    assert len(tox["values"]) == 2 and tox["std"] == pytest.approx(statistics.stdev(tox["values"]))
    cross = summary["cross_judge"]["win_rate"]["rlhf"]  # [policy seed][judge seed]
    assert [cross[0][0], cross[1][1]] == summary["table"]["win-rate vs base (RM)"]["rlhf"]["values"]
    assert summary["table"]["win-rate, other seeds' RMs"]["rlhf"]["values"] == [cross[0][1], cross[1][0]]
    printed = capsys.readouterr().out
    assert "win-rate, other seeds' RMs" in printed and "±" in printed and "seed-1" in printed

    # the run folder moved elsewhere and its base copied: every stage is found cached (keys follow
    # what the base is, not the path it is read from), and the cross-judge reads the moved folder's
    # reward models and prompts, not the paths its results recorded
    moved, base = tmp_path / "moved", tmp_path / "base-copy"
    shutil.move(out, moved)
    shutil.copytree(quick_run / "base", base)
    stamps = sorted(moved.glob("seed-*/*/stage.json"))
    assert {p.parent.name for p in stamps} >= {"reward", "sft", "rlhf", "eval"}
    before = [p.stat().st_mtime_ns for p in stamps]
    assert main(["-q", "demo", "--quick", "--seeds", "2", "--out", str(moved), f"model.base={base}"]) == 0
    remade = [f"{p.parent.parent.name}/{p.parent.name}" for p, t in zip(stamps, before) if p.stat().st_mtime_ns != t]
    assert remade == []
    judges = json.loads((moved / "summary.json").read_text())["cross_judge"]["judges"]
    assert [Path(j).resolve() for j in judges] == [(moved / f"seed-{s}" / "reward").resolve() for s in (0, 1)]
