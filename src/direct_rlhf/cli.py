"""The one entry point: `direct-rlhf {toyworld,pretrain,demo,...}`.

Every user mistake surfaces as one line on stderr and exit status 2 (see errors.UserError);
configuration is loaded and validated here, once, before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import UserError
from .io import check_writable_dir

log = logging.getLogger("direct_rlhf")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        raise UserError(f"{message} (see '{self.prog} --help')")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML recipe, or the name of a built-in one: toy (the default), "
                   "quick, smollm2-135m, mistral-7b")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. pretrain.steps=100")


def _load(args: argparse.Namespace, writes_run_folder: bool = True, stages: tuple[str, ...] = ()):
    """The validated config, and everything checkable before any work: input files, toy data standing
    in for a real model's (for the `stages` the command runs), the run folder."""
    from .config import load_config
    from .pipeline import check_input_files, check_stage_folders, refuse_toy_data

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "out", None):
        cfg.out = str(args.out)
    check_input_files(cfg, *stages)
    refuse_toy_data(cfg, *stages)
    if writes_run_folder:
        check_writable_dir(cfg.out)  # before any work, not when the first file is written
        check_stage_folders(cfg)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return cfg


def _builds_only(args: argparse.Namespace, command: str, *own: str) -> None:
    """Under several processes (torchrun, accelerate launch), the command builds only its `own`
    stages: any other it needs must exist, or every process stops with one line naming the
    command that builds it (pipeline.build_only)."""
    import shlex

    from .pipeline import build_only

    same = [*(["--config", args.config] if args.config else []), *(["--out", str(args.out)] if args.out else []),
            *args.overrides]
    build_only(own, command, shlex.join(same))


def cmd_toyworld(args: argparse.Namespace) -> None:
    from .data.toyworld.generate import write_world

    cfg = _load(args, writes_run_folder=False)  # --out is the world folder itself, replaced whole
    check_writable_dir(args.out)
    manifest = write_world(cfg.world, args.out)
    total = sum(manifest["files"].values())
    print(f"toy world: {len(manifest['files'])} files, {total} records in {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .pipeline import ensure_base

    cfg = _load(args)
    _builds_only(args, "pretrain")  # pretraining runs in one process: several are refused
    print(f"base model: {ensure_base(cfg, progress=not args.quiet)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import format_summary, run_demo

    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    if args.quick and args.config is None:
        args.config = "quick"
    cfg = _load(args, stages=("reward", "sft", "ppo", "eval"))
    from .pipeline import launched_processes

    if launched_processes() > 1:
        raise UserError(f"demo runs in one process, not {launched_processes()}: under several, run each stage's "
                        "command (reward, sft, ppo) once the stages before it exist")
    summary = run_demo(cfg, seeds=args.seeds, with_sft_rlhf=args.with_sft_rlhf, progress=not args.quiet)
    print(format_summary(summary))
    wall, made = summary["wall_s"], summary["stage_wall_s"]["total"]
    cached = f" (cached stages reused; the stages took {made / 60:.1f} min when made)" if made > wall else ""
    print(f"wall time: {wall / 60:.1f} min{cached}")
    for report in summary["reports"]:
        print(f"report: {report}")


def cmd_chat(args: argparse.Namespace) -> None:
    import math

    from .chat import chat

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    chat(args.model_dir, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
         trust_remote_code=args.trust_remote_code, chat_format_name=args.chat_format)


def _print_once(text: str) -> None:
    """A result line from the first process only: under torchrun every process runs the command."""
    if os.environ.get("RANK", "0") == "0":
        print(text)


def cmd_sft(args: argparse.Namespace) -> None:
    from .pipeline import ensure_sft

    cfg = _load(args, stages=("sft",))
    _builds_only(args, "sft", "sft")
    _print_once(f"sft model: {ensure_sft(cfg, progress=not args.quiet)}")


def cmd_ppo(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from .pipeline import ensure_policy

    cfg = _load(args, stages=("ppo",))
    _builds_only(args, "ppo")  # the reward (and cost) model and the base must exist under several processes
    policy = ensure_policy(cfg, progress=not args.quiet, resume=args.resume)
    if PartialState().is_main_process:  # once, not once per process
        print(f"policy: {policy}")


def cmd_reward(args: argparse.Namespace) -> None:
    cfg = _load(args, writes_run_folder=not args.eval_only, stages=() if args.eval_only else ("reward",))
    if args.eval_only:
        from .train.reward import evaluate_folder, format_accuracy

        if not args.model or not args.data:
            raise UserError("--eval-only needs --model DIR and --data FILE")
        print(format_accuracy(evaluate_folder(args.model, args.data, cfg.reward.subset, cfg.reward.eval_split,
                                              cfg.reward.skip_invalid, cfg.model.chat_format)))
        return
    from .pipeline import ensure_cost, ensure_reward

    _builds_only(args, "reward", "reward", "cost")  # data parallel (train/reward.py); the base must exist
    _print_once(f"reward model: {ensure_reward(cfg, progress=not args.quiet)}")
    if args.cost or cfg.reward.cost_model:
        _print_once(f"cost model: {ensure_cost(cfg, progress=not args.quiet)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.runner import check_models, parse_models, run_eval
    from .pipeline import eval_sources, run_dir

    cfg = _load(args, writes_run_folder=False, stages=("eval",))  # it writes to its own --out, checked below
    models = parse_models(args.models)  # checked before any work
    out = check_writable_dir(args.eval_out or run_dir(cfg) / "eval")
    check_models(cfg, models)  # before the toy world is built for them
    run_eval(cfg, models, out, eval_sources(cfg), progress=not args.quiet)
    print(f"results: {out / 'results.json'}\nreport: {out / 'report.html'}")


def cmd_config_show(args: argparse.Namespace) -> None:
    from .config import load_config
    from .config_docs import markdown, show_yaml

    if args.markdown:
        if args.config or args.overrides:
            raise UserError("config show --markdown documents the defaults: it takes no --config or overrides")
        print(markdown(), end="")
        return
    print(show_yaml(load_config(args.config, args.overrides)), end="")


def cmd_report(args: argparse.Namespace) -> None:
    from .eval.report import report_from_dir

    print(f"report: {report_from_dir(args.results_dir)}")


def _stage(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """A sub-command that runs stages into a run folder, configured by a recipe + overrides."""
    s = sub.add_parser(name, help=help)
    s.add_argument("--out", type=Path, help="run folder (default: the recipe's 'out')")
    _config_args(s)
    s.set_defaults(func=func)
    return s


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="direct-rlhf", description="RLHF applied directly to a base model (no SFT), with the evidence.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("toyworld", help="generate the toy world (JSONL) into a folder")
    s.add_argument("--out", required=True, type=Path, help="output folder (replaced whole and atomically; "
                   "a folder of files direct-rlhf did not write is refused)")
    _config_args(s)
    s.set_defaults(func=cmd_toyworld)

    _stage(sub, "pretrain", cmd_pretrain, "train the toy tokenizer and pretrain the tiny base model")

    s = _stage(sub, "reward", cmd_reward, "train the Bradley-Terry reward model (and the cost model with --cost)")
    s.add_argument("--cost", action="store_true", help="also train the cost (harmfulness) model into <out>/cost")
    s.add_argument("--eval-only", action="store_true", help="only report pairwise accuracy of --model on --data")
    s.add_argument("--model", type=Path, metavar="DIR", help="with --eval-only: a saved reward model folder")
    s.add_argument("--data", metavar="FILE", help="with --eval-only: pairs (JSONL, save_to_disk folder or HF name)")

    _stage(sub, "sft", cmd_sft, "the SFT baseline: fine-tune the base on the chosen responses")
    s = _stage(sub, "ppo", cmd_ppo, "PPO from the base model (no SFT), KL-anchored to the base")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")

    s = sub.add_parser("eval", help="evaluate models on the three axes; writes results.json and report.html")
    s.add_argument("--models", required=True, metavar="NAME=DIR,...",
                   help="named models, each a Hugging Face folder or hub id, e.g. base=runs/toy/base,rlhf=runs/toy/rlhf")
    s.add_argument("--out", dest="eval_out", type=Path, metavar="DIR", help="output folder (default: <out>/eval)")
    _config_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("config", help="show the config a command will use, each key with its help and range")
    show = s.add_subparsers(dest="action", required=True, parser_class=_Parser).add_parser(
        "show", help="print the resolved config as YAML, each key with its help and range")
    _config_args(show)
    show.add_argument("--markdown", action="store_true", help="print the reference of every key and its default "
                      "instead (docs/config.md)")
    show.set_defaults(func=cmd_config_show)

    s = sub.add_parser("report", help="rebuild report.html and the figures from RESULTS_DIR/results.json")
    s.add_argument("results_dir", type=Path, metavar="RESULTS_DIR")
    s.set_defaults(func=cmd_report)

    s = _stage(sub, "demo", cmd_demo, "run the whole experiment on the toy world and write the report")
    s.add_argument("--quick", action="store_true", help="smaller sizes, same stages (recipes/quick.yaml)")
    s.add_argument("--seeds", type=int, default=1, help="repeat the training stages with N seeds")
    s.add_argument("--with-sft-rlhf", action="store_true", help="also run PPO from the SFT model")

    s = sub.add_parser("chat", help="multi-turn chat in the terminal with a causal-LM folder")
    s.add_argument("model_dir", help="a model folder (e.g. runs/toy/rlhf), a hub id or a .gguf file")
    s.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens")
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="run the model folder's own modelling code (as model.trust_remote_code does)")
    s.add_argument("--chat-format", choices=("hh", "template"), default="hh",
                   help="hh: HH transcripts (default); template: the tokenizer's own chat template "
                        "(as model.chat_format)")
    s.set_defaults(func=cmd_chat)
    for parser in (p, *sub.choices.values(), show):
        parser.epilog = CONFIG_EPILOG
    return p


CONFIG_EPILOG = ("config keys: 'direct-rlhf config show [--config X] [KEY=VALUE ...]' prints every key of the "
                 "config a command will use, with its help and range; docs/config.md lists them all")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but KEY=VALUE overrides may also follow an option (`ppo --resume ppo.steps=450`),
    which argparse alone refuses once an option has ended the positional list."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(build_parser(), argv)
        # under a launcher only the first process says what it does; every process warns
        quiet = args.quiet or int(os.environ.get("RANK", "0")) > 0
        logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                            format="%(message)s", stream=sys.stderr)
        if quiet:  # libraries' own progress bars too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        args.func(args)
        if "torch.distributed" in sys.modules:  # a command that trained or scored; `--help` stays light
            from .train.sharding import close_processes

            close_processes()
    except UserError as err:
        print(f"direct-rlhf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("direct-rlhf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
