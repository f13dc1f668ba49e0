"""Each config key's help and range live with its field (config.py); `config show` and docs/config.md
are generated from them, so neither can drift from the code."""

from __future__ import annotations

import dataclasses

from direct_rlhf.config import Config


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
