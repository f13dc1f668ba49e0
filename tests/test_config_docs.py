"""Each config key's help and range live with its field (config.py); `config show` and docs/config.md
are generated from them, so neither can drift from the code."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from direct_rlhf.config import Config, load_config


def _fields(obj, prefix: str = ""):
    """Every field of a config, sections and LoRA sub-sections included, by its dotted key."""
    for f in dataclasses.fields(obj):
        yield prefix + f.name, f
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{f.name}.")


def test_every_key_has_a_one_line_help():
    keys = dict(_fields(Config()))
    assert "ppo.critic_lora.r" in keys and "world.seed" in keys
    missing = [k for k, f in keys.items() if not f.metadata.get("help")]
    multi = [k for k, f in keys.items() if "\n" in f.metadata.get("help", "")]
    assert not missing, f"config keys without help: {missing}"
    assert not multi, f"config keys whose help is not one line: {multi}"


def test_docs_config_md_is_what_make_config_docs_writes():
    """Adding or changing a key (or a built-in recipe) without `make config-docs` goes red here."""
    from direct_rlhf.config_docs import markdown

    written = (Path(__file__).parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    assert written == markdown(), "docs/config.md is stale: run `make config-docs` and commit it"


@pytest.mark.parametrize("recipe, overrides", [(None, []), ("mistral-7b", ["ppo.steps=7", "reward.split=train[:9]"])])
def test_config_show_is_a_recipe_that_loads_back_to_the_same_config(tmp_path, recipe, overrides):
    """What `config show` prints is the whole resolved config: run with it as --config, a command
    gets exactly the config shown, and every key carries its help and range."""
    from direct_rlhf.config_docs import show_yaml

    cfg = load_config(recipe, overrides)
    text = show_yaml(cfg)
    (tmp_path / "shown.yaml").write_text(text, encoding="utf-8")
    assert load_config(tmp_path / "shown.yaml") == cfg
    assert all(re.search(r"  # \S.* \[.+\]$|^\s*\w+:  # \S", line) for line in text.splitlines()), text
    assert "\n  steps: 200  # PPO steps" in text if not overrides else "\n  steps: 7  # PPO steps" in text
    assert "\n  kl_estimator: k1  # per-token KL estimator in the reward [one of k1, k3]" in text


def test_every_command_help_points_to_the_config_reference():
    from direct_rlhf.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"ppo", "reward", "sft", "eval", "demo", "config"} <= set(commands)
    for p in (parser, *commands.values()):
        text = " ".join(p.format_help().split())
        assert "direct-rlhf config show" in text and "docs/config.md" in text, p.prog
