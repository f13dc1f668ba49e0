"""Where each stage's artifacts live under a run folder, and when they can be reused.

    <out>/world/   toy world (JSONL)          <out>/base/    base model (pretrained here, or the user's)
    <out>/logs/<stage>/metrics.jsonl          ... later stages add reward/, sft/, rlhf/, eval/

Each `ensure_*` returns the artifact, building it only when its cache key changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from .artifacts import cache_key, file_digest, is_fresh, model_identity, read_key, source_identity
from .config import Config
from .errors import UserError

log = logging.getLogger("direct_rlhf")


RESUMABLE_PPO_SETTINGS = ("steps", "save_every", "sample_every")


_said_cached: set[tuple[str, str]] = set()


def _log_cached(what: str, out: str | Path) -> None:
    """Once per artifact and process: every later stage asks for the world and the base again."""
    if (what, str(out)) not in _said_cached:
        _said_cached.add((what, str(out)))
        log.info("%s: cached at %s", what, out)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.out)


def launched_processes() -> int:
    """How many processes `torchrun` / `accelerate launch` started (WORLD_SIZE); 1 otherwise."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# Under several processes, the stages a command needs but does not itself run must already exist:
# built there, the first process would train them while the others wait at a barrier, which times
# out (30 min) long before a 7B reward model is trained. Set by `build_only`; None: build anything.
_builds: tuple[frozenset[str], str, str] | None = None  # (own stages, this command, its arguments)

# the command that builds each upstream stage (the toy world comes with the toy base)
_BUILT_BY = {"world": "pretrain", "base": "pretrain", "reward": "reward", "cost": "reward --cost", "sft": "sft"}
_WHAT = {"world": "toy world", "base": "pretrained toy base model", "reward": "reward model", "cost": "cost model",
         "sft": "SFT model"}


def build_only(own: tuple[str, ...] | None, command: str = "", arguments: str = "") -> None:
    """Under a launch of several processes, let the ensure_* functions build only the `own`
    stages (the command's own) and refuse any other that is missing or stale, naming the command
    that builds it; None lifts the rule. A single process builds everything, as always."""
    global _builds
    _builds = None if own is None or launched_processes() < 2 else (frozenset(own), command, arguments)


def _may_build(cfg: Config, stage: str) -> None:
    """Called by each ensure_* just before it builds `stage` (see `build_only`): one line, on every process."""
    if _builds is None or stage in _builds[0]:
        return
    own, command, arguments = _builds
    # without model.base, pretrain writes the world with the base; with it, only the command itself does
    builder = command if stage == "world" and cfg.model.base else _BUILT_BY[stage]
    line = " ".join(part for part in ("direct-rlhf", builder, arguments) if part)
    how = "one process" if builder == "pretrain" else "under the same launcher, or one process"
    raise UserError(f"{launched_processes()} processes launched, but the {_WHAT[stage]} ({run_dir(cfg) / stage}) is "
                    f"missing or stale, and one process would build it while the others wait at a barrier that "
                    f"times out: run '{line}' first ({how})")


STAGE_FOLDERS = ("world", "base", "reward", "cost", "sft", "rlhf", "eval")  # each replaced whole when rebuilt
# (section, key): the stage reading it is the section's; local files only (reward.data and sft.data
# may name a hub dataset)
INPUT_FILES = (("ppo", "prompts"), ("ppo", "ptx_data"), ("eval", "redteam"), ("eval", "conversation"),
               ("eval", "badwords"))


def check_input_files(cfg: Config, *stages: str) -> None:
    """A missing input file of the `stages` a command runs is one line before any work, not a
    traceback when its stage comes (for the evaluation's files, after every model has trained); a
    file only other stages read does not hold a command up (`reward` with evaluation files still to
    be written)."""
    for section, name in INPUT_FILES:
        if section not in stages:
            continue
        value = getattr(getattr(cfg, section), name)
        if value and not Path(value).expanduser().is_file():
            raise UserError(f"{section}.{name}: file not found: {value}")
    if "ppo" in stages:
        check_holdout(cfg)


def refuse_two_conversation_sets(cfg: Config) -> None:
    """ppo.validation_holdout is refused in one line beside ppo.validation_conversation (two sources
    of the guard's conversation set, neither one quietly ignored)."""
    pc = cfg.ppo
    if pc.validation_holdout > 0 and pc.validation_conversation is not None:
        raise UserError(f"ppo.validation_holdout={pc.validation_holdout} and ppo.validation_conversation both name "
                        f"the balance guard's conversation set: set one (ppo.validation_holdout=0 to use the file)")


def check_holdout(cfg: Config) -> None:
    """ppo.validation_holdout, checked before any work: `refuse_two_conversation_sets`, and with a
    ppo.prompts file, a fraction that leaves too few prompts to train on, or none held out."""
    pc = cfg.ppo
    if pc.validation_holdout <= 0:
        return
    refuse_two_conversation_sets(cfg)
    if pc.prompts and Path(pc.prompts).expanduser().is_file():
        from .data.prompt_files import prompt_texts
        from .eval.validation import holdout_split

        holdout_split(prompt_texts(pc.prompts), pc.validation_holdout, cfg.seed, pc.rollout_batch_size)


def is_own_base(cfg: Config) -> bool:
    """Whether `model.base` names a model of the user's (a hub id or their folder), not one that
    direct-rlhf pretrained on the toy world (a seed run of `demo --seeds` reads the shared one)."""
    import json

    from .artifacts import STAMP

    if not cfg.model.base:
        return False
    try:
        return json.loads((Path(cfg.model.base).expanduser() / STAMP).read_text()).get("stage") != "pretrain"
    except (OSError, ValueError):
        return True


def refuse_toy_data(cfg: Config, *stages: str) -> None:
    """With the user's own base model, a stage whose data setting is unset must not quietly train or
    evaluate on the toy world's data: one line naming every such key, before any work. `stages`:
    the stages the command runs (reward, sft, ppo, eval)."""
    if not is_own_base(cfg):
        return
    r, p, ev = cfg.reward, cfg.ppo, cfg.eval
    needs = []
    trains_reward = "reward" in stages or ("ppo" in stages and not (p.reward_model and
                                                                   (p.cost_model or not p.lagrangian)))
    if r.data is None and trains_reward:
        needs.append("reward.data (preference pairs)")
    if "sft" in stages and cfg.sft.data is None and r.data is None:
        needs.append("sft.data or reward.data (pairs whose chosen responses SFT trains on)")
    if "ppo" in stages and p.prompts is None and r.data is None:
        needs.append("ppo.prompts (or reward.data, whose prompts PPO then uses)")
    if "ppo" in stages and p.ptx_coef > 0 and p.ptx_data is None:
        needs.append("ppo.ptx_data (or ppo.ptx_coef=0)")
    if "ppo" in stages and (p.select == "balanced" or p.eval_every > 0):  # the balance guard's validation sets
        no_conversation = p.validation_conversation is None and p.validation_holdout == 0
        guard = [f"ppo.validation_{name} (a JSONL of prompts)" for name, missing in
                 (("redteam", p.validation_redteam is None), ("conversation", no_conversation)) if missing]
        if p.validation_general.strip() == "toy":
            guard.append("ppo.validation_general (none or lm-eval task ids, with ppo.validation_general_limit)")
        if guard:
            needs.append(", ".join(guard) + " for the balance guard (or ppo.select=last ppo.eval_every=0: no guard)"
                         + (" (ppo.validation_holdout, e.g. 0.002 of 160k prompts, holds that fraction of the PPO prompts out of "
                            "training as the conversation set)" if no_conversation else ""))
    if "eval" in stages:
        needs += [f"eval.{name} (a JSONL of prompts)" for name in ("redteam", "conversation")
                  if getattr(ev, name) is None]
        if _toy_general(cfg):
            needs.append("eval.general (standard, none or lm-eval task ids; 'toy' is the toy world's questions)")
    if needs:
        raise UserError(f"model.base is your own model ({cfg.model.base}), so the toy world's data will not "
                        f"stand in for yours: set {'; '.join(needs)}")


def _toy_general(cfg: Config) -> bool:
    """Whether eval.general names toy tasks (the toy world's multiple-choice questions)."""
    spec = cfg.eval.general
    return spec == "toy" or any(t.strip().startswith("toy_") for t in spec.split(","))


def check_stage_folders(cfg: Config) -> None:
    """Refuse, before any work, a run folder where a stage folder holds files direct-rlhf did not
    write: that stage would otherwise train and then refuse to replace it."""
    from .io import check_replaceable

    for name in STAGE_FOLDERS:
        check_replaceable(run_dir(cfg) / name)


# settings that name one of our artifacts (keyed by the artifact's own key) or a data file (by its contents)
ARTIFACT_SETTINGS = (("model", "base"), ("reward", "init"), ("ppo", "reward_model"), ("ppo", "cost_model"),
                     ("eval", "reward_model"))
DATA_SETTINGS = (("ppo", "prompts"), ("ppo", "ptx_data"), ("sft", "data"), ("reward", "data"), ("reward", "eval_data"))


def keyed_settings(cfg: Config, *sections: str) -> dict:
    """Config sections for a stage's cache key, with each setting that names one of our artifacts
    (`model.base`, `ppo.reward_model`, ...) replaced by that artifact's key, and each data file by
    its contents. The key then follows what the inputs *are*, not where they lie: a run folder
    copied or moved elsewhere (or a seed run reading the shared base under another path) finds its
    stages cached, and a prompt file edited in place is not. A hub id or a folder without a stamp
    stays as written."""
    settings = _settings(cfg, *sections)
    for section, name in ARTIFACT_SETTINGS:
        if settings.get(section, {}).get(name):
            settings[section][name] = model_identity(settings[section][name])
    for section, name in DATA_SETTINGS:
        if settings.get(section, {}).get(name):
            settings[section][name] = source_identity(settings[section][name])
    return settings


def _settings(cfg: Config, *sections: str) -> dict:
    """`cfg.section_dict`, less `model.chat_format` while it is the default: HH is what every stage
    was made with before the setting existed, so their cached folders stay valid."""
    settings = cfg.section_dict(*sections)
    if settings.get("model", {}).get("chat_format") == "hh":
        del settings["model"]["chat_format"]
    reward = settings.get("reward", {})
    reward.pop("save_every", None)  # when to checkpoint changes no weight
    settings.get("sft", {}).pop("save_every", None)
    if reward.get("micro_batch_size") == 0:  # one pass per process: the reward models made before it existed
        del reward["micro_batch_size"]
    return settings


def conversation_format(cfg: Config, model: str | None = None):
    """The chat format (`model.chat_format`) of `model` (default `model.base`): HH needs nothing
    loaded; `template` reads the model's tokenizer (a one-line error when it has no template)."""
    from .data.chat_format import HH, chat_format

    if cfg.model.chat_format == "hh":
        return HH
    from .models.loading import load_tokenizer

    src = model or cfg.model.base
    if src is None:
        raise UserError(TOY_HAS_NO_TEMPLATE)
    return chat_format(cfg.model.chat_format, load_tokenizer(src, cfg.model.trust_remote_code), str(src))


TOY_HAS_NO_TEMPLATE = ("model.chat_format=template, but the toy model (model.base: null) has no chat template: "
                       "set model.chat_format=hh, or model.base to a model that has one")


def ensure_world(cfg: Config) -> Path:
    from .artifacts import stamp
    from .data.toyworld.generate import GENERATOR_VERSION, write_world

    out = run_dir(cfg) / "world"
    key = cache_key("world", GENERATOR_VERSION, asdict(cfg.world))
    if is_fresh(out, key):
        _log_cached("toy world", out)
        return out
    _may_build(cfg, "world")
    write_world(cfg.world, out)
    stamp(out, key, stage="world")
    log.info("toy world: written to %s", out)
    return out


def ensure_base(cfg: Config, progress: bool = True) -> str:
    """The base model: the user's (a folder or hub id) or the toy one, pretrained when stale."""
    if not cfg.model.base and cfg.model.chat_format != "hh":
        raise UserError(TOY_HAS_NO_TEMPLATE)  # before pretraining a model it could not be used with
    if cfg.model.base:
        from .models.loading import check_causal_lm

        # before any stage builds on it: a reward folder given by mistake would otherwise first
        # have a new reward model trained from it (replacing <out>/reward), and fail only at PPO
        check_causal_lm(cfg.model.base, cfg.model.trust_remote_code)
        return cfg.model.base
    from .train.pretrain import pretrain

    world = ensure_world(cfg)
    out = run_dir(cfg) / "base"
    # keyed by the corpus itself: changing preference pairs or prompts does not retrain the base
    key = cache_key("base", file_digest(world / "corpus.jsonl"), cfg.seed, _settings(cfg, "model", "pretrain"))
    if is_fresh(out, key):
        _log_cached("base model", out)
        return str(out)
    _may_build(cfg, "base")
    log.info("base model: pretraining into %s", out)
    pretrain(cfg, world / "corpus.jsonl", out, run_dir(cfg) / "logs" / "pretrain", key, progress)
    return str(out)


def ensure_reward(cfg: Config, progress: bool = True) -> str:
    """The Bradley-Terry reward model in `<out>/reward`, trained when stale (see train/reward.py)."""
    return _ensure_preference_model(cfg, "reward", progress)


def ensure_cost(cfg: Config, progress: bool = True) -> str:
    """The cost (harmfulness) model in `<out>/cost`: harmless pairs, roles swapped, for PPO-Lagrangian."""
    return _ensure_preference_model(cfg, "cost", progress)


def _ensure_preference_model(cfg: Config, stage: str, progress: bool) -> str:
    from .train.reward import preference_data, train_preference_model

    refuse_toy_data(cfg, "reward")
    needs_world = cfg.reward.data is None
    # Data first: a bad file must fail in a second, not after pretraining a base model.
    data = preference_data(cfg, ensure_world(cfg) if needs_world else None, cost=stage == "cost",
                           fmt=conversation_format(cfg, cfg.reward.init))  # rendered for the model it trains
    init = cfg.reward.init or ensure_base(cfg, progress)
    out = run_dir(cfg) / stage
    key = cache_key(stage, model_identity(init), data.key, read_key(run_dir(cfg) / "world") if needs_world else None,
                    cfg.seed, keyed_settings(cfg, "reward"), cfg.model.dtype)
    if is_fresh(out, key):
        _log_cached(f"{stage} model", out)
        return str(out)
    _may_build(cfg, stage)
    log.info("%s model: training into %s", stage, out)
    train_preference_model(cfg, init, data, out, run_dir(cfg) / "logs" / stage, key, progress, stage=stage)
    return str(out)


def ptx_texts(ptx_data: str | None, world: Path | None) -> list[str]:
    """PPO-ptx text: the user's `ptx_data`, else the toy world's knowledge documents (not its
    mixed-quality dialogues, which would pull the policy back towards rude and evasive answers)."""
    from .io import read_jsonl

    if ptx_data:
        return [r["text"] for r in read_jsonl(ptx_data, required=("text",))]
    from .data.toyworld.generate import PTX_SOURCES

    return [r["text"] for r in read_jsonl(Path(world) / "corpus.jsonl", required=("text", "source"))
            if r["source"] in PTX_SOURCES]


def ensure_policy(cfg: Config, progress: bool = True, resume: bool = False, init: str | None = None,
                  name: str = "rlhf") -> str:
    """PPO from the base model (or from `init`, e.g. the SFT model for the conventional pipeline)
    into `<out>/<name>`; checkpoints and metrics under `<out>/<name>-work`.

    Under several processes every process reads the upstream artifacts, which must exist already
    (`build_only`: the CLI refuses, in one line on every process, a launch that would have one
    process build them while the others wait at a barrier); a single process builds them here.
    """
    from .data.prompt_files import prompt_texts
    from .data.prompt_truncation import fit_prompts
    from .train.common import refuse_sharding
    from .train.ppo import PPOTrainer

    refuse_sharding()
    refuse_toy_data(cfg, "ppo")
    refuse_two_conversation_sets(cfg)  # the fraction itself is checked by the split below, before any training
    pc = cfg.ppo
    from_pairs = pc.prompts is None and cfg.reward.data is not None
    if pc.ptx_coef > 0 and pc.ptx_data is None and cfg.reward.data is not None:
        raise UserError("ppo.ptx_coef > 0 mixes in pretraining text: give ppo.ptx_data (JSONL with 'text') "
                        "for your own data, or set ppo.ptx_coef=0")
    guarded = pc.select == "balanced" or pc.eval_every > 0
    if pc.select == "balanced" and pc.eval_every == 0:
        raise UserError("ppo.select=balanced chooses among evaluated steps: set ppo.eval_every (e.g. 25)")
    needs_world = ((pc.prompts is None and not from_pairs) or (pc.ptx_coef > 0 and pc.ptx_data is None)
                   or (guarded and (pc.validation_redteam is None or pc.validation_general.strip() == "toy"
                                    or (pc.validation_conversation is None and pc.validation_holdout == 0))))
    world = ensure_world(cfg) if needs_world else None
    if from_pairs:  # user data without a prompt file: the preference data's prompts
        from .data.preferences import load_pairs

        prompts = list(dict.fromkeys(p.prompt for p in load_pairs(cfg.reward.data, split=cfg.reward.split,
                                                                skip_invalid=cfg.reward.skip_invalid)[0]))
    else:
        prompts = prompt_texts(pc.prompts or world / "ppo_prompts.jsonl")
    held_out, holdout = None, None
    if pc.validation_holdout > 0:  # split before the cut: on the prompts as given, whatever the model
        from .eval.validation import holdout_split

        prompts, held_out, holdout = holdout_split(prompts, pc.validation_holdout, cfg.seed, pc.rollout_batch_size)
        log.info("ppo.validation_holdout=%g: %d of %d distinct PPO prompts held out of training as the balance "
                 "guard's conversation set, %d left to train on", pc.validation_holdout, holdout["held_out"],
                 holdout["of"], holdout["train"])
    start = init or ensure_base(cfg, progress)
    # cut to the model: a pasted 3000-turn chat log grew PPO to 24 GB (data/prompt_truncation.py)
    prompts, n_cut, budget = fit_prompts(prompts, start, cfg.model.trust_remote_code, pc.max_prompt_len,
                                         pc.max_new_tokens, "ppo", cfg.model.chat_format)
    reward = pc.reward_model or ensure_reward(cfg, progress)
    cost = (pc.cost_model or ensure_cost(cfg, progress)) if pc.lagrangian else None
    out, work = run_dir(cfg) / name, run_dir(cfg) / f"{name}-work"
    # where the prompts and the PPO-ptx text come from, when no ppo.* setting names them
    prompt_source = None if pc.prompts else (
        [source_identity(cfg.reward.data), cfg.reward.split, cfg.reward.skip_invalid] if from_pairs
        else read_key(world))
    ptx_source = [None if pc.ptx_data else read_key(world), cfg.pretrain.seq_len] if pc.ptx_coef > 0 else None
    inputs = (model_identity(start), model_identity(reward), model_identity(cost) if cost else None,
              cfg.seed, prompt_source, ptx_source)
    settings = keyed_settings(cfg, "ppo", "model")
    key = cache_key("ppo", *inputs, settings)
    # a checkpoint may be continued by a longer run (`--resume ppo.steps=N`): its key leaves out
    # the settings that do not change the steps already taken
    kept = {k: v for k, v in settings["ppo"].items() if k not in RESUMABLE_PPO_SETTINGS}
    resume_key = cache_key("ppo-resume", *inputs, {**settings, "ppo": kept})
    if is_fresh(out, key):
        _log_cached(f"{name} policy", out)
        return str(out)
    ptx = ptx_texts(pc.ptx_data, world) if pc.ptx_coef > 0 else None
    log.info("%s policy: PPO from %s into %s", name, start, out)
    t0 = time.perf_counter()
    trainer = PPOTrainer(cfg, start, reward, prompts, work, cost_path=cost, ptx_texts=ptx, key=key,
                         progress=progress, resume_key=resume_key)
    guard = _balance_guard(cfg, trainer, world, start, work, held_out) if guarded else None
    trainer.train(resume=resume, guard=guard)
    info = {"stage": "ppo", "key": key, "seed": cfg.seed, "init": start, "reward": reward,
            "config": cfg.section_dict("ppo"), "stopped_early": trainer.stopped_early,
            "prompts": {"n": len(prompts), "cut": n_cut, "budget_tokens": budget,
                        **({"holdout": holdout} if holdout else {})},
            "reward_stats": trainer.reward.stats(),
            "guard": guard and guard.selection}
    if guard is not None and pc.select == "balanced":  # the last policy too, beside the chosen one
        _save_last_then_load_chosen(trainer, guard, run_dir(cfg) / f"{name}-last", info)
    info["wall_s"] = time.perf_counter() - t0  # of this process: a resumed run's last part
    trainer.save_policy(out, info)
    trainer.acc.wait_for_everyone()
    return str(out)


def _balance_guard(cfg: Config, trainer, world: Path | None, start: str, work: Path,
                   held_out: list[str] | None = None):
    """The balance guard (train/balance_guard.py) on the recipe's validation sets or the toy world's
    (`held_out`: the PPO prompts ppo.validation_holdout kept out of training, as the conversation set),
    judging win-rates with the trainer's own reward model (normalised, as PPO scores). The sets are
    read by every process (a bad file stops each with its line); only the main process evaluates,
    so only it holds a validator (and its toxicity classifier)."""
    from .eval.validation import Validator, validation_sets
    from .train.balance_guard import BalanceGuard

    sets = validation_sets(cfg, world, start, held_out)

    def score(prompts, responses):
        with trainer._autocast():
            return trainer.reward.normalise(trainer.reward.score(prompts, responses))

    validator = Validator(cfg, sets, trainer.tokenizer, score, str(trainer.acc.device), cfg.ppo.validation_samples) \
        if trainer.acc.is_main_process else None
    return BalanceGuard(validator, cfg.ppo, work, start, cfg.model.trust_remote_code)


def _save_last_then_load_chosen(trainer, guard, last_out: Path, info: dict) -> None:
    """<out>/<name>-last: the last step's policy, the actor untouched; then the actor takes the
    chosen checkpoint's weights, for save_policy to write as the run's policy. Every process calls
    it: under fsdp both are collective (the actor gathered whole, as save_policy gathers it; the
    checkpoint's shards loaded by every process, resharded)."""
    from .train.common import save_model_folder

    last_info: dict = {}
    if trainer.acc.is_main_process:
        sel = guard.selection
        # its record names the chosen step: kept under another key, so that the report does not
        # present this folder as the guard's choice
        last_info = {**{k: v for k, v in info.items() if k != "guard"}, "guard_of_chosen_policy": sel,
                     "policy": f"the last step's ({sel['last_step']}), not the chosen one"}
    if trainer.fsdp:  # the float32 master weights, as <out>/<name> is saved
        trainer.save_policy(last_out, last_info)
    elif trainer.acc.is_main_process:  # from a plain copy (the merged one of a LoRA actor)
        save_model_folder(last_out, guard.plain_policy(trainer).eval(), trainer.tokenizer, last_info)
    chosen = guard.chosen_checkpoint() if trainer.acc.is_main_process else None
    from accelerate.utils import broadcast_object_list

    if trainer.acc.num_processes > 1:
        chosen = broadcast_object_list([chosen])[0]
    if chosen is not None:
        trainer.load_actor(chosen)


def ensure_sft(cfg: Config, progress: bool = True) -> str:
    """The SFT baseline in `<out>/sft`: the base fine-tuned on the chosen responses."""
    from .data.preferences import load_pairs
    from .train.sft import train_sft

    refuse_toy_data(cfg, "sft")
    # the chosen responses of: sft.data, else the reward model's preference data, else the toy world's
    own, from_reward = cfg.sft.data, cfg.sft.data is None and cfg.reward.data is not None
    world = ensure_world(cfg) if own is None and not from_reward else None
    source = own or cfg.reward.data or str(world / "pairs_train.jsonl")
    pairs, load = load_pairs(source, split=cfg.reward.split if from_reward else "train",
                             skip_invalid=cfg.sft.skip_invalid or (from_reward and cfg.reward.skip_invalid),
                             fmt=conversation_format(cfg))
    base = ensure_base(cfg, progress)
    out = run_dir(cfg) / "sft"
    key = cache_key("sft", model_identity(base), read_key(world) if world else source_identity(source), cfg.seed,
                    keyed_settings(cfg, "sft", "model"),
                    *([cfg.reward.split, cfg.reward.skip_invalid] if from_reward else []))
    if is_fresh(out, key):
        _log_cached("sft model", out)
        return str(out)
    _may_build(cfg, "sft")
    log.info("sft model: fine-tuning %s on %d chosen responses into %s", base, len(pairs), out)
    logs = run_dir(cfg) / "logs" / "sft"  # checkpoints continued by a killed run's next start (same key)
    train_sft(cfg, base, pairs, out, logs, key, progress, load=asdict(load), checkpoints=logs / "checkpoints",
              save_every=cfg.sft.save_every)
    return str(out)


def default_reward_model(cfg: Config) -> str | None:
    """eval.reward_model, else the run's own reward model (<out>/reward) when it has been trained."""
    if cfg.eval.reward_model:
        return cfg.eval.reward_model
    own = run_dir(cfg) / "reward"
    return str(own) if (own / "reward_stats.json").is_file() else None


def eval_sources(cfg: Config):
    """What the evaluation reads besides its models (eval/runner.py takes it from here and never
    builds anything itself): the prompt files the recipe names, else the toy world's, built when
    needed (refused for the user's own base model), and the judge."""
    from .eval.runner import EvalSources

    refuse_toy_data(cfg, "eval")
    ev = cfg.eval
    world = ensure_world(cfg) if _toy_general(cfg) or ev.redteam is None or ev.conversation is None else None
    return EvalSources(world=world, reward_model=default_reward_model(cfg),
                       redteam=Path(ev.redteam) if ev.redteam else world / "eval" / "redteam.jsonl",
                       conversation=Path(ev.conversation) if ev.conversation else world / "eval" / "conversation.jsonl")


def ensure_eval(cfg: Config, models: dict[str, str], progress: bool = True) -> Path:
    """`models` on the three axes into `<out>/eval` (results.json, report.html), reused while the
    models, prompts, judge, seed and eval settings are unchanged; never with a remote judge
    (eval.judge_url), whose answers we cannot pin down."""
    from .artifacts import stamp
    from .eval.runner import RESULTS_SCHEMA, run_eval

    ev, out = cfg.eval, run_dir(cfg) / "eval"
    sources = eval_sources(cfg)
    key = None
    if not ev.judge_url:
        from .eval.logit_lens import shipped_badwords

        files = {name: file_digest(path) for name, path in  # the shipped bad-word list too: it may change
                 (("redteam", ev.redteam), ("conversation", ev.conversation),
                  ("badwords", ev.badwords or shipped_badwords())) if path}
        judge = sources.reward_model
        key = cache_key("eval", RESULTS_SCHEMA, {name: model_identity(src) for name, src in models.items()},
                        read_key(run_dir(cfg) / "world"), files, judge and model_identity(judge), cfg.seed,
                        keyed_settings(cfg, "eval", "model"))
        if (out / "results.json").is_file() and is_fresh(out, key):
            _log_cached("evaluation", out)
            return out
    t0 = time.perf_counter()
    run_eval(cfg, models, out, sources, progress=progress)
    if key is not None:
        stamp(out, key, stage="eval", wall_s=time.perf_counter() - t0)
    return out
