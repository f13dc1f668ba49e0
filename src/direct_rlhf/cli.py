"""The one entry point: `direct-rlhf {toyworld,pretrain,demo,...}`.

Every user mistake surfaces as one line on stderr and exit status 2 (see errors.UserError);
configuration is loaded and validated here, once, before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError

log = logging.getLogger("direct_rlhf")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        raise UserError(f"{message} (see '{self.prog} --help')")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML recipe (default: the embedded recipes/toy.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. pretrain.steps=100")


def _load(args: argparse.Namespace):
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "out", None):
        cfg.out = str(args.out)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return cfg


def cmd_toyworld(args: argparse.Namespace) -> None:
    from .data.toyworld.generate import write_world

    cfg = _load(args)
    manifest = write_world(cfg.world, args.out)
    total = sum(manifest["files"].values())
    print(f"toy world: {len(manifest['files'])} files, {total} records in {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .pipeline import ensure_base

    cfg = _load(args)
    print(f"base model: {ensure_base(cfg)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .pipeline import ensure_base

    cfg = _load(args)
    base = ensure_base(cfg)
    print(f"base model: {base}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="direct-rlhf", description="RLHF applied directly to a base model (no SFT), with the evidence.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("toyworld", help="generate the toy world (JSONL) into a folder")
    s.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    _config_args(s)
    s.set_defaults(func=cmd_toyworld)

    s = sub.add_parser("pretrain", help="train the toy tokenizer and pretrain the tiny base model")
    s.add_argument("--out", type=Path, help="run folder (default: the recipe's 'out')")
    _config_args(s)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("demo", help="run the whole experiment on the toy world and write the report")
    s.add_argument("--out", type=Path, help="run folder (default: the recipe's 'out')")
    _config_args(s)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(message)s", stream=sys.stderr)
        args.func(args)
    except UserError as err:
        print(f"direct-rlhf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("direct-rlhf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
