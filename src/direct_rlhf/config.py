"""Typed, validated configuration: a YAML recipe plus `section.key=value` overrides.

Configs are plain dataclasses whose field defaults are the toy demo's settings, in this one file;
a recipe (`recipes/*.yaml`) overrides them. They are validated once, here, at the edge: an unknown
key, a wrong type or a missing file raises `UserError` naming the key and the file, so no stage
downstream has to re-check anything.
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

from .config_ranges import check_ranges
from .errors import UserError


@dataclass
class WorldConfig:
    """Sizes of the generated toy world (see docs/toyworld.md)."""

    seed: int = 0
    fact_templates_per_fact: int = 4
    n_dialogues: int = 6000
    n_pairs: int = 6000
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
    gradient_checkpointing: bool = False   # trade compute for memory in trained models (large models)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # trained weights over processes: whole on each, or FSDP2-sharded (SFT only)
    fsdp_cpu_offload: bool = False         # with fsdp: parameter shards, gradients and the optimiser step on the CPU
    chat_format: Literal["hh", "template"] = "hh"  # HH transcripts (the paper's), or the tokenizer's own template


@dataclass
class PretrainConfig:
    steps: int = 900
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 20


@dataclass
class LoraConfig:
    """LoRA through peft. With LoRA, the PPO reference is the base with adapters disabled."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class RewardConfig:
    """Bradley-Terry reward model (and the cost model for PPO-Lagrangian)."""

    data: str | None = None          # JSONL file, save_to_disk folder or HF dataset name; null = the toy world's pairs
    eval_data: str | None = None     # held-out pairs; null = toy world's held-out pairs / the HF eval_split /
                                     # an eval_fraction of a local data file
    eval_fraction: float = 0.05      # held out of a local `data` file when eval_data is null
    split: str = "train"             # split of an HF dataset
    eval_split: str = "test"
    subset: Literal["all", "helpful", "harmless"] = "all"
    init: str | None = None          # model to start from; null = the base model
    cost_model: bool = False         # also train a harmfulness (cost) model on the harmless pairs
    epochs: int = 5                  # held-out helpful accuracy still climbs after 3 (fact pairs are learnt last)
    batch_size: int = 32             # pairs per step over all processes (each takes batch_size / processes)
    micro_batch_size: int = 0        # pairs per forward pass in a process, gradients accumulated; 0: its whole share
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_len: int = 256
    margin: bool = True              # use a per-pair 'margin' field when the data has one
    skip_invalid: bool = False       # drop (and count) records that break a per-record rule instead of
                                     # stopping; for public datasets with a few broken transcripts
    center_coef: float = 0.01
    min_lr_ratio: float = 0.1        # cosine schedule floor, as a fraction of lr
    grad_clip: float = 1.0
    stats_pairs: int = 1000          # training pairs scored for reward_stats.json (mean/std); 0 = all
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 100            # checkpoint every N steps (and each epoch's end) to resume from; 0: epochs only
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SFTConfig:
    """The conventional pipeline's first stage, for comparison: fine-tune on chosen responses."""

    data: str | None = None          # pairs whose chosen responses SFT trains on; null = reward.data's (its
                                     # split and skip_invalid), else the toy world's
    skip_invalid: bool = False       # as reward.skip_invalid, for sft.data
    epochs: int = 1
    batch_size: int = 32             # the global batch: each of N processes takes batch_size / N rows
    micro_batch_size: int = 0        # rows per forward pass in a process, gradients accumulated; 0 = its whole share
    lr: float = 5e-4
    warmup_steps: int = 10
    max_len: int = 256
    log_every: int = 10
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PPOConfig:
    """PPO from the base model, KL-anchored to it (see algos/ppo.py for the math)."""

    prompts: str | None = None        # JSONL with a 'prompt' field; null = the toy world's PPO prompts
    reward_model: str | None = None   # reward model folder; null = this run's <out>/reward (trained if missing)
    cost_model: str | None = None     # cost model folder for ppo.lagrangian; null = this run's <out>/cost
    steps: int = 200                  # x 2 epochs. Toy world, 3 seeds: 300 steps gave gold +4.2 points,
                                      # over-refusal -4.2, win-rate +0.02 (8 samples a prompt); 200 fits the
                                      # demo's 15 minutes (README, PPO length)
    rollout_batch_size: int = 32      # prompts per PPO step (per process)
    mini_batch_size: int = 32
    micro_batch_size: int = 8         # rows per forward pass; rows are grouped by length and each group
                                      # cut to its own width, gradients accumulated
    micro_batch_tokens: int = 0       # also at most this many token positions per forward pass (0: rows only):
                                      # bounds a pass's memory on spread lengths, fills passes of short rows
    pack_rows: bool = True            # each micro-batch's rows packed end to end, no padding at all, attention
                                      # on a grid of the rows (SDPA or eager; flash-attention 2 keeps its own);
                                      # false: each row padded to its group's longest
    ppo_epochs: int = 2               # (toy world, seeds 0/2, 8 samples a held-out prompt: gold +3.4 points,
                                      # win-rate +0.02 over 150 x 4; the same PPO time on one thread)
    max_new_tokens: int = 48
    max_prompt_len: int = 256         # tokens; a longer prompt loses its oldest turns (data/prompt_truncation.py),
                                      # and none exceeds the model's context less max_new_tokens (toy: <= 93)
    temperature: float = 1.0
    top_p: float = 1.0
    actor_lr: float = 5e-4            # LoRA adapters (1e-3 cost the toy model 2-4 points of general accuracy)
    critic_lr: float = 5e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_coef: float = 0.1
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = True
    kl_target: float = 1.5            # per-sequence KL the adaptive controller aims for (nats)
    kl_horizon: int = 500
    kl_stop: float = 2.0              # with adaptive_kl: stop early when the sequence KL, averaged over the last
    kl_stop_window: int = 10          # kl_stop_window steps, exceeds kl_stop x kl_target (a policy running away
                                      # from the base to game the reward; the controller is too slow), and roll
                                      # the policy back to the newest checkpoint from before that window; 0 = never
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    reward_clip: float = 5.0          # clip the normalised reward to +-this
    no_end_penalty: float = -1.0      # added to the score of a response that never ends its turn
    ptx_coef: float = 1.0             # PPO-ptx: weight of the LM loss on pretraining text (0 = off)
    ptx_batch_size: int = 8
    ptx_data: str | None = None       # JSONL with a 'text' field; null = the toy world's knowledge text
    lagrangian: bool = False          # PPO-Lagrangian with the cost model
    cost_threshold: float = 0.0       # lambda rises while the rollouts' mean cost is above this; the cost model's
                                      # 0 separates unsafe (> 0) from safe (< 0) answers (docs/ppo-lagrangian.md)
    lambda_init: float = 1.0
    lambda_lr: float = 0.05
    save_every: int = 20
    sample_every: int = 10
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None  # attention kernel of
                                      # actor, reference, critic and reward model; null = transformers' default
                                      # (sdpa). With pack_rows, actor, reference and critic run it on a grid
                                      # of the packed rows (flash_attention_2 reads them from position ids)
    rollout_backend: Literal["hf", "vllm"] = "hf"   # generation: Hugging Face generate, or vLLM colocated on
                                      # the trainer's GPU (needs CUDA and `pip install vllm`)
    vllm_gpu_memory_utilization: float = 0.3  # the GPU memory fraction vLLM takes (weights + KV cache)
    merged_rollout: bool = True       # with LoRA and the hf backend: sample from a plain copy of the model
                                      # holding the actor's weights with the adapters added (one more copy
                                      # of the weights; generation 10-25% faster on the toy model); false:
                                      # sample through peft's adapter layers
    bf16: bool = False                # mixed precision: every forward pass (generation, scoring, experience,
                                      # PPO epochs) under bfloat16 autocast; weights, optimiser and loss math
                                      # stay float32
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True, r=16, alpha=32))
    # LoRA on the critic's transformer too (its value head stays fully trained): the critic then
    # needs no gradients or optimiser state for its backbone, which for a 7B model is what decides
    # whether PPO fits on one GPU. Off by default: the toy recipe's critic is fully trained.
    critic_lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=False, r=16, alpha=32))


@dataclass
class EvalConfig:
    """`direct-rlhf eval` (see eval/runner.py). Defaults fit the toy world: 3 models in < 3 min on 2 CPU cores."""

    general: str = "toy"              # "toy", "standard", "none", or a comma-separated list of lm-eval task ids
    general_limit: int | None = None
    device: str = "cpu"               # where models run: "cpu", "cuda", "cuda:1", ...
    batch_size: int = 32              # lm-eval, logit lens, classifier and reward-model batches
    generation_batch_size: int = 100  # rows sampled together
    samples_per_prompt: int = 4       # k sampled responses per red-team prompt
    conversation_samples: int = 2     # sampled responses per conversation prompt
    max_new_tokens: int = 48
    max_prompt_len: int = 256         # tokens; as ppo.max_prompt_len, for the red-team and conversation prompts
    temperature: float = 1.0
    top_p: float = 1.0
    redteam: str | None = None        # red-team prompts (JSONL, 'prompt' field); null = the toy world's
    conversation: str | None = None   # conversation prompts (JSONL: prompt, kind, gold); null = the toy world's
    toxicity_classifier: str = "profanity-check"   # or a HF text-classification folder / id
    toxicity_label: str | None = None  # the classifier's toxic label; null = guessed from its label names
    toxicity_threshold: float = 0.5
    badwords: str | None = None       # bad-word list for the logit-lens probe; null = the shipped list
    reward_model: str | None = None   # judge of the win-rate; null = <out>/reward when it exists, else skipped
    tie_eps: float = 0.01             # |r(a) - r(b)| <= tie_eps (in reward std units) is a tie
    common_random_numbers: bool = True  # every model sampled with the same seeds (same model, same samples);
                                        # false: each model its own seeds (independent samples)
    bootstrap: int = 2000             # bootstrap resamples for intervals of means
    transcripts: int = 6              # sample transcripts per prompt set shown in the report
    judge_url: str | None = None      # optional OpenAI-compatible judge endpoint (off by default)
    judge_model: str | None = None
    judge_timeout_s: float = 30.0


@dataclass
class Config:
    seed: int = 0
    out: str = "runs/toy"
    threads: int | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def section_dict(self, *names: str) -> dict[str, Any]:
        """The config of some sections as plain data: the cache key of a stage's artifacts. The
        settings in `KEYED_UNLESS_DEFAULT` are left out at their defaults (what every stage was made
        with before they existed), so the folders made before them stay cached."""
        out = {n: dataclasses.asdict(getattr(self, n)) if dataclasses.is_dataclass(getattr(self, n))
               else getattr(self, n) for n in names}
        sharded = any(n in SHARDED_STAGES for n in names)
        for (section, key), default in KEYED_UNLESS_DEFAULT.items():
            if section in out and (out[section].get(key, default) == default
                                   or (section == "model" and not sharded)):
                out[section].pop(key, None)
        return out


# (section, key): default. Settings added after stages were cached whose default trains as before.
KEYED_UNLESS_DEFAULT: dict[tuple[str, str], Any] = {
    ("model", "strategy"): "ddp", ("model", "fsdp_cpu_offload"): False, ("sft", "micro_batch_size"): 0,
}
# The stages whose trainer reads model.strategy (train/sharding.py): the others' keys leave the
# model section's sharding settings out, so an fsdp SFT run finds its base cached.
SHARDED_STAGES = ("sft",)


DEFAULT_RECIPE = "toy.yaml"


def recipe_path(name: str) -> Path:
    """Path of an embedded recipe (shipped inside the package)."""
    return Path(str(resources.files("direct_rlhf") / "recipes" / name))


def builtin_recipes() -> list[str]:
    """Names of the embedded recipes, e.g. ['mistral-7b', 'quick', 'toy']."""
    return sorted(p.name[:-len(".yaml")] for p in resources.files("direct_rlhf").joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_recipe(path: str | Path | None) -> Path:
    """A recipe file: `path` itself when it exists, else the embedded recipe of that name
    (`--config mistral-7b` works from any folder), else the embedded toy recipe when None."""
    if path is None:
        return recipe_path(DEFAULT_RECIPE)
    src = Path(path)
    if src.is_file():
        return src
    name = src.name[:-len(".yaml")] if src.name.endswith(".yaml") else src.name
    if src.parent == Path(".") and name in builtin_recipes():
        return recipe_path(f"{name}.yaml")
    raise UserError(f"config file not found: {src} (built-in recipes: {', '.join(builtin_recipes())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe (a file, an embedded recipe's name, or the embedded toy recipe when `path` is
    None), apply overrides, validate."""
    src = resolve_recipe(path)
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
    cfg = _build(Config, raw, label, prefix="")
    check_ranges(cfg, label)
    return cfg


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
    node[leaf] = _override_value(value)


def _override_value(text: str) -> Any:
    """A command-line value read as YAML (`3`, `1e-4`, `true`, `[a, b]`); text YAML cannot read
    (`*.jsonl`, `@name`, `[4`) is kept as the string it is, and the key's type check judges it."""
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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
