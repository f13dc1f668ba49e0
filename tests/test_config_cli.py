"""Config validation at the edge: each mistake is one line on stderr and exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from direct_rlhf.config import load_config
from direct_rlhf.errors import UserError


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "direct_rlhf.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["world.sed=1"], "unknown config key 'world.sed'"),
    (["world.seed=abc"], "config key 'world.seed' must be int"),
    (["model.dtype=float64"], "must be one of"),
    (["--config", "does-not-exist.yaml"], "config file not found: does-not-exist.yaml"),
    (["pretrain.log_every=0"], "config key 'pretrain.log_every' must be >= 1, got 0"),
    (["world.n_pairs=[4"], "config key 'world.n_pairs' must be int, got '[4'"),  # not YAML: taken as text
    (["world.toxic_rate_when_benign=nan"], "'world.toxic_rate_when_benign' must be a finite number, got nan"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, args, needle):
    res = _cli("toyworld", "--out", str(tmp_path / "w"), *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "w").exists()  # nothing half-written


def test_an_out_folder_that_cannot_be_ours_is_refused_before_any_work(tmp_path):
    """--out is checked before the first stage runs, and a folder is only ever replaced whole
    when direct-rlhf wrote it: a user's file or folder is never deleted."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("mine too")
    for out, needle in [("notes.txt", "exists and is not a folder"),
                        ("notes.txt/run", "is not a folder, so"),
                        ("mine", "a folder with files direct-rlhf did not write"),
                        (".", "is the current folder or one above it")]:
        res = _cli("toyworld", "--out", out, cwd=tmp_path)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.stderr
    res = _cli("-q", "eval", "--models", "a=nowhere", "--out", "notes.txt", cwd=tmp_path)
    assert res.returncode == 2 and "notes.txt: exists and is not a folder" in res.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "mine" / "thesis.tex").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]
    # a run folder whose stage folder holds the user's files: refused before any stage runs
    (tmp_path / "run" / "reward").mkdir(parents=True)
    (tmp_path / "run" / "reward" / "notes.md").write_text("mine")
    res = _cli("-q", "reward", "--out", "run", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "run/reward: a folder with files direct-rlhf did not write" in res.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["reward"]  # no world, no base was built
    # a missing evaluation file: one line before the demo trains anything (it was a traceback after PPO)
    res = _cli("-q", "demo", "--quick", "--out", "run2", "eval.redteam=nowhere.jsonl", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "direct-rlhf: error: eval.redteam: file not found: nowhere.jsonl"], res.stderr
    assert not (tmp_path / "run2").exists()
    # a world direct-rlhf wrote is replaced whole, as before
    assert _cli("toyworld", "--out", "w", "world.n_pairs=20", cwd=tmp_path).returncode == 0
    assert _cli("toyworld", "--out", "w", "world.n_pairs=20", cwd=tmp_path).returncode == 0


def test_config_names_a_built_in_recipe_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("mistral-7b").model.base == "mistralai/Mistral-7B-v0.1"
    assert load_config("quick.yaml").model.hidden_size == 64
    assert load_config("toy") == load_config()
    (tmp_path / "quick.yaml").write_text("pretrain:\n  steps: 7\n")  # a file of that name wins
    assert load_config("quick.yaml").pretrain.steps == 7
    with pytest.raises(UserError, match="built-in recipes: mistral-7b, quick, smollm2-135m, toy"):
        load_config("mistral")


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pretrain:\n  stepz: 3\n")
    with pytest.raises(UserError, match=r"r\.yaml.*'pretrain\.stepz'"):
        load_config(recipe)


@pytest.mark.parametrize("override, message", [
    ("reward.eval_every=0", "'reward.eval_every' must be >= 1, got 0"),
    ("ppo.grad_clip=0", "'ppo.grad_clip' must be > 0, got 0.0"),
    ("ppo.top_p=1.5", "'ppo.top_p' must be in (0, 1], got 1.5"),
    ("ppo.gamma=-0.1", "'ppo.gamma' must be in [0, 1], got -0.1"),
    ("ppo.lora.dropout=1", "'ppo.lora.dropout' must be in [0, 1), got 1.0"),
    ("reward.eval_fraction=1", "'reward.eval_fraction' must be in (0, 1), got 1.0"),
    ("eval.samples_per_prompt=0", "'eval.samples_per_prompt' must be >= 1, got 0"),
    ("seed=-1", "'seed' must be in [0, 4294967295], got -1"),  # numpy's generator refused it with a traceback
    ("eval.toxicity_threshold=1.5", "'eval.toxicity_threshold' must be in [0, 1], got 1.5"),
    ("model.num_heads=3", "the heads must divide the hidden size"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [override])


def test_head_counts_are_checked_only_for_the_tiny_model_we_build():
    assert load_config(None, ["model.num_heads=3", "model.base=some/model"]).model.num_heads == 3


def test_every_shipped_recipe_is_in_range():
    from direct_rlhf.config import recipe_path

    for name in ("toy.yaml", "quick.yaml", "mistral-7b.yaml", "smollm2-135m.yaml"):
        cfg = load_config(recipe_path(name))
        if cfg.model.strategy == "fsdp":  # fsdp trains every weight: a LoRA stage would stop at its first line
            loras = {"reward": cfg.reward.lora, "sft": cfg.sft.lora, "ppo": cfg.ppo.lora, "critic": cfg.ppo.critic_lora}
            assert not [k for k, lora in loras.items() if lora.enabled], name
    assert load_config(None, ["ppo.entropy_coef=-0.02", "ppo.no_end_penalty=-2"]).ppo.entropy_coef == -0.02


def test_overrides_may_follow_an_option_and_anything_else_is_refused(tmp_path):
    res = _cli("toyworld", "world.seed=1", "--out", str(tmp_path / "w"), "world.sed=1")
    assert res.returncode == 2 and "unknown config key 'world.sed'" in res.stderr  # read, not ignored
    res = _cli("toyworld", "--out", str(tmp_path / "w"), "world.seed=1", "--nope")
    assert res.returncode == 2 and "unrecognized arguments: --nope" in res.stderr
    assert not (tmp_path / "w").exists()


def test_overrides_are_typed():
    cfg = load_config(None, ["pretrain.lr=1e-3", "pretrain.steps=7", "model.base=null"])
    assert cfg.pretrain.lr == 1e-3 and cfg.pretrain.steps == 7 and cfg.model.base is None


def test_help_lists_the_subcommands():
    res = _cli("--help")
    assert res.returncode == 0
    for name in ("toyworld", "pretrain", "demo"):
        assert name in res.stdout


@pytest.mark.parametrize("args", [["world.sed=1"], ["pretrain.log_every=0"], ["--config", "does-not-exist.yaml"]])
def test_config_show_refuses_a_config_as_every_command_does(tmp_path, args):
    shown = _cli("config", "show", *args)
    run = _cli("toyworld", "--out", str(tmp_path / "w"), *args)
    assert shown.returncode == run.returncode == 2 and shown.stdout == ""
    assert shown.stderr == run.stderr and len(shown.stderr.strip().splitlines()) == 1


def test_config_show_prints_the_resolved_config_and_the_markdown_reference():
    from direct_rlhf.config_docs import markdown, show_yaml

    res = _cli("config", "show", "--config", "quick", "ppo.steps=3")
    assert res.returncode == 0 and res.stdout == show_yaml(load_config("quick", ["ppo.steps=3"])), res.stderr
    res = _cli("config", "show", "--markdown")
    assert res.returncode == 0 and res.stdout == markdown()
    res = _cli("config", "show", "--markdown", "ppo.steps=3")
    assert res.returncode == 2 and "takes no --config or overrides" in res.stderr
