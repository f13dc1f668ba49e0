"""A broken weights file, wherever a model is loaded (policy, reward model, critic, GGUF), is one
line naming it and exit status 2, not a SafetensorError traceback."""

from __future__ import annotations

import pytest

import tiny_eval_models as tiny
from direct_rlhf.cli import main
from direct_rlhf.errors import UserError
from direct_rlhf.models.reward_model import RewardScorer
from direct_rlhf.train.ppo_models import ValueModel


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


def test_a_truncated_policy_is_one_line_in_chat(tmp_path, capsys):
    tok = tiny.tokenizer()
    folder = _truncate(tiny.save(tiny.causal_lm(tok), tok, tmp_path / "policy"))
    capsys.readouterr()
    assert main(["chat", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err and "cannot load" in err, err


def test_a_truncated_reward_model_is_one_line_for_the_scorer_and_the_critic(tmp_path):
    folder = _truncate(tiny.reward_folder(tiny.tokenizer(), tmp_path / "rm"))
    for load in (lambda: RewardScorer(folder), lambda: ValueModel.from_reward_model(folder)):
        with pytest.raises(UserError, match=f"{folder}: cannot load the reward model"):
            load()


def test_a_gguf_file_that_is_not_one_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIRECT_RLHF_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file" * 10)
    assert main(["chat", str(fake)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(fake) in err, err
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-written
