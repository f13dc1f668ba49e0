"""With the user's own base model, no stage quietly trains or evaluates on the toy world's data,
and the evaluation takes its prompt files from its caller (it never builds the toy world)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import direct_rlhf.eval.runner as runner
from direct_rlhf.cli import main
from direct_rlhf.config import load_config
from direct_rlhf.pipeline import is_own_base, refuse_toy_data

OWN = "some-org/some-base"  # a hub id: refused before anything would load it


@pytest.mark.parametrize("command, needle", [
    (["eval", "--models", f"base={OWN}"], "eval.redteam (a JSONL of prompts); eval.conversation (a JSONL of "
                                          "prompts); eval.general"),
    (["demo"], "reward.data (preference pairs); sft.data or reward.data"),
    (["ppo", "ppo.ptx_coef=0"], "set reward.data (preference pairs); ppo.prompts"),
    (["ppo", f"ppo.reward_model={OWN}", "ppo.ptx_coef=0"], "set ppo.prompts (or reward.data"),
    (["ppo", "reward.data=x.jsonl", "ppo.ptx_coef=0"], "set ppo.validation_redteam (a JSONL of prompts), "
     "ppo.validation_conversation (a JSONL of prompts), ppo.validation_general (none or lm-eval task ids, with "
     "ppo.validation_general_limit) for the balance guard (or ppo.select=last ppo.eval_every=0: no guard)"),
    (["reward"], "set reward.data (preference pairs)"),
    (["sft"], "set sft.data or reward.data"),
])
def test_an_own_base_model_with_a_toy_fallback_is_one_line_before_any_work(tmp_path, capsys, command, needle):
    out = tmp_path / "run"
    assert main(["-q", command[0], "--out", str(out), *command[1:], f"model.base={OWN}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"model.base is your own model ({OWN})" in err[0] and needle in err[0], err
    assert not out.exists()  # no toy world, nothing trained


def test_the_toy_base_and_fully_named_data_pass(tmp_path):
    toy_base = tmp_path / "base"
    toy_base.mkdir()
    (toy_base / "stage.json").write_text(json.dumps({"key": "k", "stage": "pretrain"}))
    assert not is_own_base(load_config(None, [f"model.base={toy_base}"]))  # `demo --seeds` reads the shared one
    assert is_own_base(load_config(None, [f"model.base={tmp_path}"]))
    refuse_toy_data(load_config(None, [f"model.base={toy_base}"]), "reward", "sft", "ppo", "eval")
    named = load_config(None, [f"model.base={OWN}", "reward.data=x.jsonl", "ppo.ptx_coef=0", "eval.redteam=r.jsonl",
                               "eval.conversation=c.jsonl", "eval.general=none", "ppo.validation_redteam=vr.jsonl",
                               "ppo.validation_conversation=vc.jsonl", "ppo.validation_general=none"])
    refuse_toy_data(named, "reward", "sft", "ppo", "eval")


def test_the_mistral_recipe_names_real_data_for_every_stage():
    cfg = load_config("mistral-7b")
    refuse_toy_data(cfg, "reward", "sft", "ppo", "eval")
    assert cfg.eval.redteam and cfg.eval.conversation and cfg.eval.general == "standard"
    assert cfg.ppo.max_prompt_len + cfg.ppo.max_new_tokens <= cfg.reward.max_len
    assert cfg.reward.warmup_steps >= 100 and cfg.sft.warmup_steps >= 100


def test_the_evaluation_never_imports_the_pipeline():
    """runner -> pipeline -> runner was an import circle: the caller builds the world and passes paths."""
    tree = ast.parse(Path(runner.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.endswith("pipeline") for m in imported), imported


def test_a_stage_is_not_held_up_by_input_files_only_other_stages_read(tmp_path, capsys):
    """The Mistral recipe names evaluation prompt files the user provides: the reward stage, which does
    not read them, gets as far as its own data (here missing), not stopped by theirs."""
    assert main(["-q", "reward", "--config", "mistral-7b", "--out", str(tmp_path / "run"),
                 f"reward.data={tmp_path / 'pairs.jsonl'}"]) == 2
    assert capsys.readouterr().err.strip() == f"direct-rlhf: error: {tmp_path / 'pairs.jsonl'}: file not found"
    assert main(["-q", "eval", "--config", "mistral-7b", "--models", f"base={OWN}", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip() == "direct-rlhf: error: eval.redteam: file not found: data/redteam.jsonl"
