"""The scalar reward model: a base LM with a one-output head, read at the last non-pad token.

It is a plain `AutoModelForSequenceClassification` (num_labels=1) so that a saved reward model is
an ordinary Hugging Face folder: `from_pretrained` gives the same scores as `RewardScorer`, with no
project code. Transformers reads the score at the *rightmost token that is not `pad_token_id`*,
which is the last real token for right padding and for left padding alike, so we only need
`pad_token_id` set in the config and a pad id that never ends a real sequence.

Tokenisation rule (training, scoring and evaluation all use `encode`): the text is
``prompt + response`` tokenised as one string; if it is longer than `max_len` tokens, tokens are
dropped from the *start* (left truncation), so the response, where the preference lives, and the
last token, where the score is read, are always kept. Special tokens the tokenizer adds (e.g. a
BOS) are kept in place.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from ..config import Config
from ..data.chat_format import special_wrapping
from ..errors import UserError
from .dropout import disable_dropout
from .loading import DTYPES, activation_checkpointing, load_tokenizer, pretrained
from .precision import float32_head, merge_in_float32, trained_dtype

STATS_FILE = "reward_stats.json"


# --------------------------------------------------------------------------------------------------
# Tokenisation and batching


def encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
           max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt+response, left-truncated to `max_len`; returns (ids, n_truncated)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    head, tail = special_wrapping(tokenizer)  # the one token-layout rule of every role
    budget = max_len - len(head) - len(tail)
    if budget < 1:
        raise UserError(f"reward.max_len={max_len} leaves no room for text")
    bodies = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    out, truncated = [], 0
    for body in bodies:
        if len(body) > budget:
            body = body[-budget:]
            truncated += 1
        out.append(head + list(body) + tail)
    return out, truncated


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), each size = (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # size = (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # size = (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence, read by the model at its last non-pad token: size = (B,)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


# --------------------------------------------------------------------------------------------------
# Building and saving


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the expected 'score.weight newly initialised' report; restore the user's settings after."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_reward_model(init: str, cfg: Config):
    """(model, tokenizer): a fresh scalar head on `init` (a causal-LM folder, hub id or GGUF file),
    LoRA if asked. Fully trained: float32; with LoRA the frozen base in `model.dtype`; the head
    float32 either way (models/precision.py). Dropout off, as in every role.

    The head is new; the backbone comes from the base model, so the reward model starts with
    everything the base knows about the world (the wrong-answer pairs need that knowledge).
    """
    tokenizer = load_tokenizer(init, cfg.model.trust_remote_code)  # checks a local path exists first
    lora = cfg.reward.lora
    with _quiet_transformers():
        model = pretrained(AutoModelForSequenceClassification, init, "a reward model from it", num_labels=1,
                           pad_token_id=tokenizer.pad_token_id,
                           dtype=DTYPES[trained_dtype(cfg.model.dtype, lora.enabled)],
                           trust_remote_code=cfg.model.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    float32_head(model.score)
    if cfg.model.gradient_checkpointing:  # only while training: a loaded reward model never has it
        activation_checkpointing(model)
    if lora.enabled:
        from .lora import add_lora

        # SEQ_CLS keeps the new score head fully trainable (peft adds it to modules_to_save).
        model = add_lora(model, lora, "SEQ_CLS")
    return disable_dropout(model), tokenizer


def load_reward_model(path: str | Path, dtype: str | None = None, trust_remote_code: bool = False):
    """A saved reward model (ours, or any one-output sequence classifier), checked before loading."""
    check_reward_folder(path, trust_remote_code)
    with _quiet_transformers():
        model = pretrained(AutoModelForSequenceClassification, path, "the reward model",
                           trust_remote_code=trust_remote_code, **({"dtype": DTYPES[dtype]} if dtype else {}))
    if model.config.pad_token_id is None:  # a classifier trained without padding; ours always sets it
        model.config.pad_token_id = load_tokenizer(path, trust_remote_code).pad_token_id
    return model


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """Merge LoRA adapters into the weights, in float32, so the saved folder needs neither peft nor us."""
    return merge_in_float32(model)


# --------------------------------------------------------------------------------------------------
# Scoring (used by PPO and evaluation: keep this interface stable)


def check_reward_folder(path: str | Path, trust_remote_code: bool = False) -> None:
    """A one-line error, before any weights load, unless `path` is a reward model: a folder made by
    `direct-rlhf reward` (it has reward_stats.json), or any Hugging Face sequence classifier with
    one output (bring your own; its statistics are then measured where it is used)."""
    if (Path(path) / STATS_FILE).is_file():
        return
    config = pretrained(AutoConfig, path, "a reward model", trust_remote_code=trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        kind = archs[0] if archs else config.model_type
        raise UserError(f"{path}: not a reward model (it is a {kind}; a reward model is a sequence classifier with "
                        f"one output, e.g. from 'direct-rlhf reward')")


class RewardScorer:
    """Score (prompt, response) pairs with a saved reward model folder; no gradients, fp32 out.

    `mean`/`std` are the reward statistics on the training set (both chosen and rejected
    responses), which PPO uses to normalise rewards so the KL coefficient means the same thing
    whatever scale the reward model happened to learn. A reward model brought from elsewhere has
    none: they are None until measured on samples (`set_stats`).
    """

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 32,
                 model: Callable[..., Any] | None = None, max_tokens: int = 0, dtype: str | None = None,
                 trust_remote_code: bool = False, max_len: int = 1024):
        """`model`: an already loaded stand-in for the folder's model, placed by the caller (PPO's
        `SharedRewardModel`); the folder then gives only the statistics and the tokenizer.
        `max_tokens`: a batch also holds at most that many token positions (0: rows only).
        `dtype`: the weights' dtype (`model.dtype`; None: as saved). `max_len`: the token limit of a
        scored text when the folder records none (a reward model from elsewhere)."""
        self.path = Path(path)
        check_reward_folder(path, trust_remote_code)
        stats_file = self.path / STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        self.mean: float | None = float(stats["mean"]) if stats else None
        self.std: float | None = float(stats["std"]) if stats else None
        self.stats_source = STATS_FILE if stats else None
        self.device = torch.device(device)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        if model is not None:
            self.model = model
        else:
            self.model = load_reward_model(path, dtype, trust_remote_code)
            self.model.to(self.device).eval()
        window = getattr(self.model.config, "max_position_embeddings", None)
        self.max_len: int = int(stats["max_len"]) if stats else min(max_len, window or max_len)
        self.pad_id = self.model.config.pad_token_id

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Raw scores, size = (N,), fp32, on the CPU, in input order."""
        ids, _ = encode(self.tokenizer, prompts, responses, self.max_len)
        return score_ids(self.model, ids, self.pad_id, self.batch_size, self.device, self.max_tokens)

    def set_stats(self, scores: torch.Tensor, source: str) -> None:
        """Normalisation statistics measured on these raw scores (a reward model that has none)."""
        self.mean, self.std = float(scores.mean()), float(scores.std()) if len(scores) > 1 else 1.0
        self.stats_source = f"measured on {len(scores)} {source}"

    def stats(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "source": self.stats_source}

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """(scores - mean) / std with the training-set statistics."""
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{self.path}: no reward statistics yet (RewardScorer.calibrate)")
        return (scores - self.mean) / max(self.std, 1e-6)


def length_sorted_chunks(lengths: Sequence[int], batch_size: int, max_tokens: int = 0) -> Iterator[list[int]]:
    """Indices in batches of at most `batch_size`, shortest first, so each batch wastes little on
    padding; with `max_tokens`, also at most that many positions once padded (a longer row alone)."""
    chunk: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if chunk and (len(chunk) == batch_size or max_tokens and (len(chunk) + 1) * lengths[i] > max_tokens):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


@torch.no_grad()
def score_ids(model: torch.nn.Module, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int,
              device: torch.device | str = "cpu", max_tokens: int = 0) -> torch.Tensor:
    """Batched no-grad scoring of token id lists, in length-sorted batches (`length_sorted_chunks`)."""
    out = torch.empty(len(ids), dtype=torch.float32)  # size = (N,)
    for chunk in length_sorted_chunks([len(s) for s in ids], batch_size, max_tokens):
        input_ids, mask = pad_right([ids[i] for i in chunk], pad_id)  # size = (b, T)
        out[chunk] = rewards(model, input_ids.to(device), mask.to(device)).cpu()
    return out
