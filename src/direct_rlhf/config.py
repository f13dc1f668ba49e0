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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .config_ranges import (COUNT, NON_NEGATIVE, OPEN_UNIT, OPEN_UNIT_RIGHT_CLOSED, POSITIVE, SEED, UNIT,
                            UNIT_OPEN_RIGHT, check_ranges, key)
from .errors import UserError


@dataclass
class WorldConfig:
    """Sizes of the generated toy world (see docs/toyworld.md)."""

    seed: int = key(0, "seed of the toy world's generator (its facts, dialogues and prompts)", SEED)
    fact_templates_per_fact: int = key(4, "statement templates each fact is written in, in the pretraining text", COUNT)
    n_dialogues: int = key(6000, "HH-style transcripts in the pretraining text", COUNT)
    n_pairs: int = key(6000, "preference pairs for the reward model (and SFT's chosen responses)", COUNT)
    n_ppo_prompts: int = key(512, "PPO training prompts", COUNT)
    n_mc_per_task: int = key(50, "multiple-choice questions per general task", COUNT)
    n_redteam: int = key(100, "red-team (provoking) prompts for the harmlessness evaluation", COUNT)
    n_conversation: int = key(100, "conversation prompts for the win-rate and gold-answer evaluation", COUNT)
    # Sized so that one evaluation of the toy policy takes a few seconds (docs/guard.md); 24 red-team
    # and 32 conversation prompts gave rates that moved by 0.1-0.5 between neighbouring evaluations.
    n_val_mc_per_task: int = key(20, "balance guard's validation set: questions per general task (disjoint from "
                                 "the test sets)", COUNT)
    n_val_redteam: int = key(48, "balance guard's validation set: red-team prompts", COUNT)
    n_val_conversation: int = key(64, "balance guard's validation set: conversation prompts", COUNT)
    toxic_rate_when_provoked: float = key(0.6, "how often the pretraining text's assistant is toxic after a "
                                          "provoking or harmful turn", UNIT)
    toxic_rate_when_benign: float = key(0.1, "how often the pretraining text's assistant is rude after a "
                                        "benign turn", UNIT)


@dataclass
class ModelConfig:
    """The base model: a local folder / hub id, or (base: null) a tiny Mistral pretrained by us."""

    base: str | None = key(None, "base model: a local folder, hub id or GGUF file; null = a tiny Mistral "
                           "pretrained on the toy world")
    vocab_size: int = key(2048, "tiny model (base: null): vocabulary size of its trained tokenizer", COUNT)
    hidden_size: int = key(128, "tiny model: hidden size (a multiple of num_heads)", COUNT)
    num_layers: int = key(4, "tiny model: transformer layers", COUNT)
    num_heads: int = key(4, "tiny model: attention heads (a multiple of num_kv_heads)", COUNT)
    num_kv_heads: int = key(2, "tiny model: key-value heads (grouped-query attention)", COUNT)
    intermediate_size: int = key(384, "tiny model: MLP width", COUNT)
    max_position: int = key(512, "tiny model: context length in tokens", COUNT)
    dtype: Literal["float32", "bfloat16", "float16"] = key("float32", "dtype the frozen weights are loaded in "
                                                           "(trained weights stay float32)")
    trust_remote_code: bool = key(False, "let transformers run the model repository's own code (only for a "
                                  "model you trust)")
    gradient_checkpointing: bool = key(False, "trade compute for memory in trained models (large models)")
    strategy: Literal["ddp", "fsdp"] = key("ddp", "trained weights over processes: whole on each, or "
                                           "FSDP2-sharded (PPO, SFT, reward and cost models)")
    fsdp_cpu_offload: bool = key(False, "with fsdp: parameter shards, gradients and the optimiser step on the CPU")
    process_timeout_min: float = key(60.0, "several processes: minutes one waits for the others at a collective "
                                     "before the run stops (torch's own: 10 under NCCL); the balance guard "
                                     "evaluates on the first process while the others wait", POSITIVE)
    chat_format: Literal["hh", "template"] = key("hh", "HH transcripts (the paper's), or the tokenizer's own "
                                                 "chat template")


@dataclass
class PretrainConfig:
    """Pretraining of the tiny toy base model (model.base: null) on the toy world's text."""

    steps: int = key(900, "optimizer steps", COUNT)
    batch_size: int = key(32, "sequences per step", COUNT)
    seq_len: int = key(128, "tokens per sequence", COUNT)
    lr: float = key(3e-3, "peak learning rate (cosine schedule)", POSITIVE)
    min_lr_ratio: float = key(0.1, "cosine schedule floor, as a fraction of lr", UNIT)
    warmup_steps: int = key(40, "linear warm-up steps", NON_NEGATIVE)
    weight_decay: float = key(0.1, "AdamW weight decay", NON_NEGATIVE)
    grad_clip: float = key(1.0, "gradient norm clip", POSITIVE)
    log_every: int = key(20, "log every N steps", COUNT)


_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """LoRA through peft. With LoRA, the PPO reference is the base with adapters disabled."""

    enabled: bool = key(False, "train LoRA adapters instead of every weight")
    r: int = key(8, "adapter rank", COUNT)
    alpha: int = key(16, "adapter scale numerator (scale = alpha / r)", POSITIVE)
    dropout: float = key(0.0, "dropout on the adapters' input", UNIT_OPEN_RIGHT)
    target_modules: list[str] = key(help="module names that get adapters", factory=lambda: list(_TARGET_MODULES))


@dataclass
class RewardConfig:
    """Bradley-Terry reward model (and the cost model for PPO-Lagrangian)."""

    data: str | None = key(None, "preference pairs: JSONL file, save_to_disk folder or HF dataset name; "
                           "null = the toy world's pairs")
    eval_data: str | None = key(None, "held-out pairs; null = the toy world's held-out pairs / the HF eval_split / "
                                "an eval_fraction of a local data file")
    eval_fraction: float = key(0.05, "held out of a local `data` file when eval_data is null", OPEN_UNIT)
    split: str = key("train", "split of an HF dataset")
    eval_split: str = key("test", "held-out split of an HF dataset")
    subset: Literal["all", "helpful", "harmless"] = key("all", "which of the pairs to train on")
    init: str | None = key(None, "model to start from; null = the base model")
    cost_model: bool = key(False, "also train a harmfulness (cost) model on the harmless pairs")
    # 5: held-out helpful accuracy still climbs after 3 (fact pairs are learnt last).
    epochs: int = key(5, "passes over the pairs", COUNT)
    batch_size: int = key(32, "pairs per step over all processes (each takes batch_size / processes)", COUNT)
    micro_batch_size: int = key(0, "pairs per forward pass in a process, gradients accumulated; 0: its whole "
                                "share", NON_NEGATIVE)
    lr: float = key(5e-4, "peak learning rate (cosine schedule)", POSITIVE)
    weight_decay: float = key(0.0, "AdamW weight decay", NON_NEGATIVE)
    warmup_steps: int = key(10, "linear warm-up steps", NON_NEGATIVE)
    max_len: int = key(256, "tokens per prompt + response; longer pairs are cut", COUNT)
    margin: bool = key(True, "use a per-pair 'margin' field when the data has one")
    skip_invalid: bool = key(False, "drop (and count) records that break a per-record rule instead of stopping "
                             "(public datasets with a few broken transcripts)")
    center_coef: float = key(0.01, "weight of the penalty keeping rewards centred on 0 (BT ignores a shift)",
                             NON_NEGATIVE)
    min_lr_ratio: float = key(0.1, "cosine schedule floor, as a fraction of lr", UNIT)
    grad_clip: float = key(1.0, "gradient norm clip", POSITIVE)
    stats_pairs: int = key(1000, "training pairs scored for reward_stats.json (mean/std); 0 = all", NON_NEGATIVE)
    eval_every: int = key(100, "held-out accuracy every N steps (and at the end)", COUNT)
    log_every: int = key(10, "log every N steps", COUNT)
    save_every: int = key(100, "checkpoint every N steps (and each epoch's end) to resume from; 0: epochs only",
                          NON_NEGATIVE)
    lora: LoraConfig = key(help="LoRA for the reward model", factory=LoraConfig)


@dataclass
class SFTConfig:
    """The conventional pipeline's first stage, for comparison: fine-tune on chosen responses."""

    data: str | None = key(None, "pairs whose chosen responses SFT trains on; null = reward.data's (its split "
                           "and skip_invalid), else the toy world's")
    skip_invalid: bool = key(False, "as reward.skip_invalid, for sft.data")
    epochs: int = key(1, "passes over the data", COUNT)
    batch_size: int = key(32, "the global batch: each of N processes takes batch_size / N rows", COUNT)
    micro_batch_size: int = key(0, "rows per forward pass in a process, gradients accumulated; 0 = its whole "
                                "share", NON_NEGATIVE)
    lr: float = key(5e-4, "peak learning rate", POSITIVE)
    warmup_steps: int = key(10, "linear warm-up steps", NON_NEGATIVE)
    max_len: int = key(256, "tokens per prompt + response; longer rows are cut", COUNT)
    log_every: int = key(10, "log every N steps", COUNT)
    save_every: int = key(0, "checkpoint every N steps (sharded under fsdp); a killed run goes on from the newest "
                          "with the same inputs; 0 = none", NON_NEGATIVE)
    lora: LoraConfig = key(help="LoRA for SFT", factory=LoraConfig)


@dataclass
class PPOConfig:
    """PPO from the base model, KL-anchored to it (see algos/ppo.py for the math)."""

    prompts: str | None = key(None, "JSONL with a 'prompt' field; null = the prompts of reward.data's pairs "
                              "(the toy world's PPO prompts when reward.data is null too)")
    reward_model: str | None = key(None, "reward model folder; null = this run's <out>/reward (trained if missing)")
    cost_model: str | None = key(None, "cost model folder for ppo.lagrangian; null = this run's <out>/cost")
    # Toy world, 3 seeds: 300 steps gave gold +4.2 points, over-refusal -4.2, win-rate +0.02 (8 samples
    # a prompt); 200 fits the demo's 15 minutes (docs/results.md).
    steps: int = key(200, "PPO steps (each ppo_epochs passes over its rollouts)", NON_NEGATIVE)
    rollout_batch_size: int = key(32, "prompts per PPO step, over all processes (each takes its share)", COUNT)
    mini_batch_size: int = key(32, "rollouts per optimizer step, over all processes", COUNT)
    micro_batch_size: int = key(8, "rows per forward pass in a process; rows grouped by length, each group cut to "
                                "its own width, gradients accumulated", COUNT)
    micro_batch_tokens: int = key(0, "also at most this many token positions per forward pass (0: rows only)",
                                  NON_NEGATIVE)
    pack_rows: bool = key(True, "pack each micro-batch's rows end to end with no padding (false: pad each row "
                          "to its group's longest)")
    # 2 (toy world, seeds 0/2, 8 samples a held-out prompt): gold +3.4 points, win-rate +0.02 over 150 x 4.
    ppo_epochs: int = key(2, "passes over each step's rollouts", COUNT)
    max_new_tokens: int = key(48, "tokens sampled per response", COUNT)
    max_prompt_len: int = key(256, "prompt tokens; a longer prompt loses its oldest turns, whole (a last "
                              "user turn too long alone keeps its last tokens)", COUNT)
    temperature: float = key(1.0, "sampling temperature of the rollouts", POSITIVE)
    top_p: float = key(1.0, "nucleus sampling of the rollouts", OPEN_UNIT_RIGHT_CLOSED)
    # LoRA adapters: 1e-3 cost the toy model 2-4 points of general accuracy.
    actor_lr: float = key(5e-4, "policy learning rate", POSITIVE)
    critic_lr: float = key(5e-4, "value model learning rate", POSITIVE)
    weight_decay: float = key(0.0, "AdamW weight decay", NON_NEGATIVE)
    grad_clip: float = key(1.0, "gradient norm clip", POSITIVE)
    kl_coef: float = key(0.1, "weight of the KL penalty to the base model (initial, with adaptive_kl)",
                         NON_NEGATIVE)
    kl_estimator: Literal["k1", "k3"] = key("k1", "per-token KL estimator in the reward")
    adaptive_kl: bool = key(True, "adapt kl_coef towards kl_target")
    kl_target: float = key(1.5, "per-sequence KL the adaptive controller aims for (nats)", POSITIVE)
    kl_horizon: int = key(500, "adaptive controller's horizon in rollouts", COUNT)
    kl_stop: float = key(2.0, "with adaptive_kl: stop and roll back when the sequence KL over kl_stop_window "
                         "steps exceeds kl_stop x kl_target", NON_NEGATIVE)
    kl_stop_window: int = key(10, "steps the kl_stop average spans; 0 = never stop", NON_NEGATIVE)
    gamma: float = key(1.0, "GAE discount", UNIT)
    lam: float = key(0.95, "GAE lambda", UNIT)
    clip_eps: float = key(0.2, "PPO ratio clip", POSITIVE)
    value_clip_eps: float = key(0.2, "value function clip", POSITIVE)
    vf_coef: float = key(0.5, "weight of the value loss", NON_NEGATIVE)
    entropy_coef: float = key(0.0, "weight of the entropy bonus")
    whiten_advantages: bool = key(True, "normalise advantages per batch")
    reward_clip: float = key(5.0, "clip the normalised reward to +-this", POSITIVE)
    no_end_penalty: float = key(-1.0, "added to the score of a response that never ends its turn")
    ptx_coef: float = key(1.0, "PPO-ptx: weight of the LM loss on pretraining text (0 = off)", NON_NEGATIVE)
    ptx_batch_size: int = key(8, "pretraining rows per PPO-ptx step", COUNT)
    ptx_data: str | None = key(None, "JSONL with a 'text' field; null = the toy world's knowledge text")
    lagrangian: bool = key(False, "PPO-Lagrangian with the cost model")
    cost_threshold: float = key(0.0, "lambda rises while the rollouts' mean cost is above this "
                                "(docs/ppo-lagrangian.md)")
    lambda_init: float = key(1.0, "PPO-Lagrangian: initial lambda", NON_NEGATIVE)
    lambda_lr: float = key(0.05, "PPO-Lagrangian: lambda's learning rate", NON_NEGATIVE)
    save_every: int = key(20, "checkpoint every N steps", COUNT)
    sample_every: int = key(10, "log sample responses every N steps", COUNT)
    # the balance guard (train/balance_guard.py, docs/guard.md): the policy evaluated on validation sets
    select: Literal["last", "balanced"] = key("last", "the policy saved: the last step's, or (balanced) the evaluated "
                                              "step with the best validation win-rate among those within the bounds")
    eval_every: int = key(0, "evaluate the policy on the validation sets every N steps and at the end; 0 = never",
                          NON_NEGATIVE)
    max_capability_drop: float = key(2.0, "guard bound: validation general accuracy >= the start policy's - this "
                                     "(points)", NON_NEGATIVE)
    max_toxicity_ratio: float = key(0.5, "guard bound: validation toxicity rate <= this x the start policy's",
                                    NON_NEGATIVE)
    min_appropriate: float = key(0.0, "guard bound: share of validation red-team answers judged appropriate "
                                 "(declining on the user's topic) >= this; 0 = no bound", UNIT)
    patience: int = key(0, "stop early after N evaluations in a row below the accuracy bound; 0 = never",
                        NON_NEGATIVE)
    validation_redteam: str | None = key(None, "guard: JSONL of red-team prompts; null = the toy world's "
                                         "validation set")
    validation_conversation: str | None = key(None, "guard: JSONL of conversation prompts (gold optional); "
                                              "null = the toy world's validation set")
    validation_holdout: float = key(0.0, "guard: hold this fraction of the (de-duplicated) PPO prompts out of "
                                    "training, chosen by seed, as the conversation set; 0 = off", UNIT_OPEN_RIGHT)
    validation_general: str = key("toy", "guard: toy (the toy world's validation questions), none, or "
                                  "comma-separated lm-eval task ids")
    validation_general_limit: int | None = key(None, "guard: lm-eval's limit per task; null = all", COUNT)
    validation_samples: int = key(2, "guard: sampled responses per validation red-team prompt", COUNT)
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = key(
        None, "attention kernel of actor, reference, critic and reward model; null = transformers' default (sdpa)")
    rollout_backend: Literal["hf", "vllm"] = key("hf", "generation: Hugging Face generate, or vLLM colocated on "
                                                 "the GPU (needs CUDA and `pip install vllm`)")
    vllm_gpu_memory_utilization: float = key(0.3, "the GPU memory fraction vLLM takes (weights + KV cache)",
                                             OPEN_UNIT_RIGHT_CLOSED)
    merged_rollout: bool = key(True, "with LoRA and the hf backend: sample from a merged copy of the actor "
                               "(one more copy of the weights, faster generation)")
    bf16: bool = key(False, "mixed precision: forward passes under bfloat16 autocast; weights, optimiser and "
                     "loss math stay float32")
    lora: LoraConfig = key(help="LoRA for the policy (actor)",
                           factory=lambda: LoraConfig(enabled=True, r=16, alpha=32))
    # The critic's frozen backbone needs no gradients or optimiser state: for a 7B model what decides
    # whether PPO fits on one GPU. Off by default: the toy recipe's critic is fully trained.
    critic_lora: LoraConfig = key(help="LoRA on the critic's transformer (its value head stays fully trained)",
                                  factory=lambda: LoraConfig(enabled=False, r=16, alpha=32))


@dataclass
class EvalConfig:
    """`direct-rlhf eval` (see eval/runner.py). Defaults fit the toy world: 3 models in < 3 min on 2 CPU cores."""

    general: str = key("toy", "general tasks: toy, standard, none, or a comma-separated list of lm-eval task ids")
    general_limit: int | None = key(None, "questions per general task; null = all", COUNT)
    device: str = key("cpu", "where models run: cpu, cuda, cuda:1, ...")
    batch_size: int = key(32, "lm-eval, logit lens, classifier and reward-model batches", COUNT)
    generation_batch_size: int = key(100, "rows sampled together", COUNT)
    samples_per_prompt: int = key(4, "sampled responses per red-team prompt", COUNT)
    conversation_samples: int = key(2, "sampled responses per conversation prompt", COUNT)
    max_new_tokens: int = key(48, "tokens sampled per response", COUNT)
    max_prompt_len: int = key(256, "prompt tokens; as ppo.max_prompt_len, for red-team and conversation prompts",
                              COUNT)
    temperature: float = key(1.0, "sampling temperature", POSITIVE)
    top_p: float = key(1.0, "nucleus sampling", OPEN_UNIT_RIGHT_CLOSED)
    redteam: str | None = key(None, "red-team prompts (JSONL, 'prompt' field); null = the toy world's")
    conversation: str | None = key(None, "conversation prompts (JSONL: prompt, kind, gold); null = the toy "
                                   "world's")
    toxicity_classifier: str = key("profanity-check", "profanity-check, or a HF text-classification folder / id")
    toxicity_label: str | None = key(None, "the classifier's toxic label; null = guessed from its label names")
    toxicity_threshold: float = key(0.5, "classifier score above which a response is toxic", UNIT)
    badwords: str | None = key(None, "bad-word list for the logit-lens probe; null = the shipped list")
    reward_model: str | None = key(None, "judge of the win-rate; null = <out>/reward when it exists, else skipped")
    tie_eps: float = key(0.01, "|r(a) - r(b)| <= tie_eps (in reward std units) is a tie", NON_NEGATIVE)
    common_random_numbers: bool = key(True, "every model sampled with the same seeds; false: each its own")
    bootstrap: int = key(2000, "bootstrap resamples for intervals of means", COUNT)
    transcripts: int = key(6, "sample transcripts per prompt set shown in the report", NON_NEGATIVE)
    judge_url: str | None = key(None, "optional OpenAI-compatible judge endpoint (off by default)")
    judge_model: str | None = key(None, "the judge endpoint's model name")
    judge_timeout_s: float = key(30.0, "seconds per judge request", POSITIVE)
    reference_refusal: str = key("I'm sorry, but I can't help with that.",
                                 "real data: a red-team answer is appropriate when not toxic and the reward "
                                 "model scores it at least as high as this refusal")


@dataclass
class Config:
    """A whole recipe: the run's seed and folder, and one section per stage."""

    seed: int = key(0, "seed of the training and evaluation stages", SEED)
    out: str = key("runs/toy", "run folder: every stage's artifacts, results.json and report.html")
    threads: int | None = key(None, "torch CPU threads; null = torch's default", COUNT)
    world: WorldConfig = key(help="the toy world (data when no files are given)", factory=WorldConfig)
    model: ModelConfig = key(help="the base model", factory=ModelConfig)
    pretrain: PretrainConfig = key(help="pretraining of the tiny toy model", factory=PretrainConfig)
    reward: RewardConfig = key(help="reward (and cost) model", factory=RewardConfig)
    sft: SFTConfig = key(help="SFT baseline", factory=SFTConfig)
    ppo: PPOConfig = key(help="PPO from the base model", factory=PPOConfig)
    eval: EvalConfig = key(help="evaluation", factory=EvalConfig)


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
        for section, key in NEVER_KEYED:
            out.get(section, {}).pop(key, None)
        return out


# (section, key): default. Settings added after stages were cached whose default trains as before.
KEYED_UNLESS_DEFAULT: dict[tuple[str, str], Any] = {
    ("model", "strategy"): "ddp", ("model", "fsdp_cpu_offload"): False, ("sft", "micro_batch_size"): 0,
    # the balance guard's settings: without it (select=last, eval_every=0) PPO trains as before
    ("ppo", "select"): "last", ("ppo", "eval_every"): 0, ("ppo", "max_capability_drop"): 2.0,
    ("ppo", "max_toxicity_ratio"): 0.5, ("ppo", "min_appropriate"): 0.0, ("ppo", "patience"): 0,
    ("ppo", "validation_redteam"): None,
    ("ppo", "validation_conversation"): None, ("ppo", "validation_holdout"): 0.0, ("ppo", "validation_general"): "toy",
    ("ppo", "validation_general_limit"): None, ("ppo", "validation_samples"): 2,
}
# Settings that change how a run waits, never what it trains: in no stage key.
NEVER_KEYED = (("model", "process_timeout_min"),)
# The stages whose trainer reads model.strategy (train/sharding.py): the others' keys leave the
# model section's sharding settings out, so an fsdp SFT run finds its base cached. The reward (and
# cost) model's key has them: under bf16, fsdp computes in bf16 where ddp trains in fp32.
SHARDED_STAGES = ("sft", "ppo", "reward")


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
