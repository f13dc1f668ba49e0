"""Where each stage's artifacts live under a run folder, and when they can be reused.

    <out>/world/   toy world (JSONL)          <out>/base/    base model (pretrained here, or the user's)
    <out>/logs/<stage>/metrics.jsonl          ... later stages add reward/, sft/, rlhf/, eval/

Each `ensure_*` returns the artifact, building it only when its cache key changed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .artifacts import cache_key, is_fresh, read_key
from .config import Config

log = logging.getLogger("direct_rlhf")


def run_dir(cfg: Config) -> Path:
    return Path(cfg.out)


def ensure_world(cfg: Config) -> Path:
    from dataclasses import asdict

    from .artifacts import stamp
    from .data.toyworld.generate import write_world

    out = run_dir(cfg) / "world"
    key = cache_key("world", asdict(cfg.world))
    if is_fresh(out, key):
        log.info("toy world: cached at %s", out)
        return out
    write_world(cfg.world, out)
    stamp(out, key, stage="world")
    log.info("toy world: written to %s", out)
    return out


def ensure_base(cfg: Config, progress: bool = True) -> str:
    """The base model: the user's (a folder or hub id) or the toy one, pretrained when stale."""
    if cfg.model.base:
        return cfg.model.base
    from .train.pretrain import pretrain

    world = ensure_world(cfg)
    out = run_dir(cfg) / "base"
    key = cache_key("base", read_key(world), cfg.seed, cfg.section_dict("model", "pretrain"))
    if is_fresh(out, key):
        log.info("base model: cached at %s", out)
        return str(out)
    log.info("base model: pretraining into %s", out)
    pretrain(cfg, world / "corpus.jsonl", out, run_dir(cfg) / "logs" / "pretrain", key, progress)
    return str(out)
