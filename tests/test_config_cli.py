"""Config validation at the edge: each mistake is one line on stderr and exit status 2."""

from __future__ import annotations

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
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, args, needle):
    res = _cli("toyworld", "--out", str(tmp_path / "w"), *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "w").exists()  # nothing half-written


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pretrain:\n  stepz: 3\n")
    with pytest.raises(UserError, match=r"r\.yaml.*'pretrain\.stepz'"):
        load_config(recipe)


def test_overrides_are_typed():
    cfg = load_config(None, ["pretrain.lr=1e-3", "pretrain.steps=7", "model.base=null"])
    assert cfg.pretrain.lr == 1e-3 and cfg.pretrain.steps == 7 and cfg.model.base is None


def test_help_lists_the_subcommands():
    res = _cli("--help")
    assert res.returncode == 0
    for name in ("toyworld", "pretrain", "demo"):
        assert name in res.stdout
