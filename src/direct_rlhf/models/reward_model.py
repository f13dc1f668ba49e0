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
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from ..config import Config
from ..errors import UserError
from .loading import DTYPES, _first_line, load_tokenizer

STATS_FILE = "reward_stats.json"


# --------------------------------------------------------------------------------------------------
# Tokenisation and batching


def encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
           max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt+response, left-truncated to `max_len`; returns (ids, n_truncated)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    head, tail = _special_wrapping(tokenizer)
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


def _special_wrapping(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after any text (e.g. Llama/Mistral's BOS)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    return [], []


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
    """(model, tokenizer): a fresh scalar head on `init` (a causal-LM folder or hub id), LoRA if asked.

    The head is new; the backbone comes from the base model, so the reward model starts with
    everything the base knows about the world (the wrong-answer pairs need that knowledge).
    """
    tokenizer = load_tokenizer(init, cfg.model.trust_remote_code)  # checks a local path exists first
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                str(init), num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=DTYPES[cfg.model.dtype],
                use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{init}: cannot build a reward model from it ({_first_line(err)})") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = cfg.reward.lora
    if lora.enabled:
        from .lora import add_lora

        # SEQ_CLS keeps the new score head fully trainable (peft adds it to modules_to_save).
        model = add_lora(model, lora, "SEQ_CLS")
    return model, tokenizer


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """Merge LoRA adapters into the weights so the saved folder needs neither peft nor us."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


# --------------------------------------------------------------------------------------------------
# Scoring (used by PPO and evaluation: keep this interface stable)


def check_reward_folder(path: str | Path) -> Path:
    """The folder's reward statistics file, or a one-line error before any weights load."""
    stats_file = Path(path) / STATS_FILE
    if not stats_file.is_file():
        raise UserError(f"{path}: not a reward model folder (no {STATS_FILE}); train one with 'direct-rlhf reward'")
    return stats_file


class RewardScorer:
    """Score (prompt, response) pairs with a saved reward model folder; no gradients, fp32 out.

    `mean`/`std` are the reward statistics on the training set (both chosen and rejected
    responses), which PPO uses to normalise rewards so the KL coefficient means the same thing
    whatever scale the reward model happened to learn.
    """

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 32,
                 model: Callable[..., Any] | None = None, max_tokens: int = 0, dtype: str | None = None,
                 trust_remote_code: bool = False):
        """`model`: an already loaded stand-in for the folder's model, placed by the caller (PPO's
        `SharedRewardModel`); the folder then gives only the statistics and the tokenizer.
        `max_tokens`: a batch also holds at most that many token positions (0: rows only).
        `dtype`: the weights' dtype (`model.dtype`; None: as saved)."""
        self.path = Path(path)
        stats = json.loads(check_reward_folder(self.path).read_text())
        self.mean: float = float(stats["mean"])
        self.std: float = float(stats["std"])
        self.max_len: int = int(stats["max_len"])
        self.device = torch.device(device)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.tokenizer = load_tokenizer(self.path, trust_remote_code)
        if model is not None:
            self.model = model
        else:
            try:
                with _quiet_transformers():
                    self.model = AutoModelForSequenceClassification.from_pretrained(
                        str(self.path), use_safetensors=True, trust_remote_code=trust_remote_code,
                        **({"dtype": DTYPES[dtype]} if dtype else {}))
            except (OSError, ValueError) as err:
                raise UserError(f"{self.path}: cannot load the reward model ({_first_line(err)})") from None
            self.model.to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Raw scores, size = (N,), fp32, on the CPU, in input order."""
        ids, _ = encode(self.tokenizer, prompts, responses, self.max_len)
        return score_ids(self.model, ids, self.pad_id, self.batch_size, self.device, self.max_tokens)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """(scores - mean) / std with the training-set statistics."""
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
