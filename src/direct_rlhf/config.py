"""Typed, validated configuration: a YAML recipe plus `section.key=value` overrides.

Configs are plain dataclasses. They are validated once, here, at the edge: an unknown key, a wrong
type or a missing file raises `UserError` naming the key and the file, so no stage downstream has
to re-check anything. Defaults live in `recipes/toy.yaml` (the embedded recipe), not scattered in code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError


@dataclass
class WorldConfig:
    """Sizes of the generated toy world (see docs/toyworld.md)."""

    seed: int = 0
    fact_templates_per_fact: int = 4
    n_dialogues: int = 6000
    n_pairs: int = 3000
    n_ppo_prompts: int = 512
    n_mc_per_task: int = 50
    n_redteam: int = 100
    n_conversation: int = 100
    toxic_rate_when_provoked: float = 0.6
    toxic_rate_when_benign: float = 0.1


@dataclass
class ModelConfig:
    """The base model: a local folder / hub id, or (base: null) a tiny Mistral pretrained by us."""

    base: str | None = None
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position: int = 512
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


@dataclass
class PretrainConfig:
    steps: int = 800
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 20


@dataclass
class Config:
    seed: int = 0
    out: str = "runs/toy"
    threads: int | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def section_dict(self, *names: str) -> dict[str, Any]:
        """The config of some sections as plain data: the cache key of a stage's artifacts."""
        return {n: dataclasses.asdict(getattr(self, n)) if dataclasses.is_dataclass(getattr(self, n))
                else getattr(self, n) for n in names}


DEFAULT_RECIPE = "toy.yaml"


def recipe_path(name: str) -> Path:
    """Path of an embedded recipe (shipped inside the package)."""
    return Path(str(resources.files("direct_rlhf") / "recipes" / name))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe (the embedded toy recipe when `path` is None), apply overrides, validate."""
    src = Path(path) if path is not None else recipe_path(DEFAULT_RECIPE)
    if not src.is_file():
        raise UserError(f"config file not found: {src}")
    try:
        raw = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f"{src}:{line + 1}" if line is not None else str(src)
        raise UserError(f"{at}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{src}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        _apply_override(raw, item)
    label = f"{src} (with overrides {' '.join(overrides)})" if overrides else str(src)
    return _build(Config, raw, label, prefix="")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"override '{item}': expected section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{item}': '{part}' is not a section")
    node[leaf] = yaml.safe_load(value) if value != "" else None


def _build(cls: type, raw: Any, src: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{src}: '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"{src}: unknown config key '{prefix}{unknown[0]}' "
                        f"(known in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, src, prefix + name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, src: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, src, key + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, src, key)
            except UserError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{src}: config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{src}: config key '{key}' must be a list, got {value!r}")
        return [_coerce(item_tp, v, src, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise UserError(f"{src}: config key '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")
