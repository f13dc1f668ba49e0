"""Preference pairs: every accepted format normalised to one `Pair`, validated once, here.

Accepted records (one per JSONL line, or one per row of a Hugging Face dataset):

* HH-RLHF raw: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``; the shared
  prompt is everything up to the last ``Assistant:`` turn.
* TRL conversational, explicit prompt: ``prompt`` / ``chosen`` / ``rejected`` as lists of
  ``{"role", "content"}`` messages (``chosen``/``rejected`` usually one assistant message).
* TRL conversational, implicit prompt: ``chosen`` / ``rejected`` as whole conversations.
* TRL standard, explicit prompt: ``prompt`` / ``chosen`` / ``rejected`` as strings. A plain-text
  prompt is one Human turn and the strings are its responses (``{"prompt": "What is 2+2?",
  "chosen": "4", ...}``); a prompt that already is an HH transcript (starts with ``Human:``) is
  taken as it is, the responses continuing its open ``Assistant:`` turn.

Optional fields: ``subset`` ("helpful" / "harmless", used by the subset filter), ``margin``
(a number; Llama-2-style BT margin) and ``chosen_safe`` / ``rejected_safe`` (true / false: is that
response safe; the cost model needs both on every harmless pair, docs/ppo-lagrangian.md). A
``system`` message is folded into the first user turn (a base model has no system slot),
separated by a blank line.

Every record becomes a list of messages (`chat_format.parse` for transcripts), rendered by the run's
chat format (`chat_format.ChatFormat`: the HH transcript by default, or the model's own template with
`model.chat_format=template`), so all formats of the same conversation give the same bytes, and
those bytes are what PPO and evaluation produce too.

Rules for bad input (one `UserError` naming file, line and problem): malformed JSON, missing
``chosen``/``rejected``, a transcript with no final Assistant turn, chosen and rejected that do not
share a prompt, a non-UTF-8 file, and no pairs at all after filtering. Pairs whose chosen equals
rejected carry no preference and are dropped (counted in `PairStats.dropped_identical`).

Public datasets are not always clean, and a long job should not die on one bad record among a
hundred thousand: with `skip_invalid` a record that breaks a per-record rule (no final Assistant
turn, different prompts, a bad field) is dropped instead, counted in `PairStats.skipped_invalid`
with the first reason kept, and logged. A malformed file (bad JSON or encoding) still stops the run.
Truncation to a token budget happens at tokenisation (see `models.reward_model.encode`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..errors import UserError
from ..io import read_jsonl
from .chat_format import HH, HUMAN, ChatFormat, Message, parse, render

Subset = Literal["all", "helpful", "harmless"]
log = logging.getLogger("direct_rlhf")


@dataclass(frozen=True)
class Pair:
    """One preference: `prompt` ends in "\\n\\nAssistant:" (HH; with a template, its generation prompt);
    responses keep their leading space and stop before the end of turn."""

    prompt: str
    chosen: str
    rejected: str
    subset: str | None = None
    margin: float | None = None
    chosen_safe: bool | None = None    # per-response safety labels (PKU-SafeRLHF's is_response_*_safe)
    rejected_safe: bool | None = None


@dataclass
class PairStats:
    """What loading did to the data, for the user to see (and for run_info.json)."""

    source: str
    rows: int = 0
    kept: int = 0
    dropped_identical: int = 0
    filtered_subset: int = 0
    skipped_invalid: int = 0               # only with skip_invalid
    first_invalid: str | None = None       # the first skipped record's problem (file:line: ...)
    by_subset: dict[str, int] = field(default_factory=dict)


SKIP_HINT = "reward.skip_invalid=true (sft.skip_invalid=true for sft.data) drops such records and counts them"


def load_pairs(source: str | Path, subset: Subset = "all", split: str = "train",
               skip_invalid: bool = False, fmt: ChatFormat = HH) -> tuple[list[Pair], PairStats]:
    """Load preference pairs from a local JSONL file, a `save_to_disk` folder or a HF dataset name.

    `split` is used only for Hugging Face datasets; `fmt` renders them (HH, or the model's template).
    Raises `UserError` for anything the user must fix.
    """
    rows, label = _read_rows(source, split)
    return pairs_from_rows(rows, label, subset, skip_invalid, fmt)


def pairs_from_rows(rows: Sequence[dict[str, Any]], label: str, subset: Subset = "all",
                    skip_invalid: bool = False, fmt: ChatFormat = HH) -> tuple[list[Pair], PairStats]:
    """Normalise raw records (each may carry `_line`, its 1-based position) into pairs."""
    stats = PairStats(source=label, rows=len(rows))
    if subset not in ("all", "helpful", "harmless"):
        raise UserError(f"{label}: unknown subset {subset!r} (expected all, helpful or harmless)")
    out: list[Pair] = []
    for i, row in enumerate(rows, 1):
        at = f"{label}:{row.get('_line', i)}"
        try:
            pair = _to_pair(row, at, fmt)
        except UserError as err:
            if not skip_invalid:
                raise UserError(f"{err} ({SKIP_HINT})") from None
            stats.skipped_invalid += 1
            stats.first_invalid = stats.first_invalid or str(err)
            continue
        if subset != "all":
            if pair.subset is None:
                raise UserError(f"{at}: no 'subset' field, so the {subset} pairs cannot be selected (label each "
                                f"record 'helpful' or 'harmless'; for the reward model reward.subset=all also works)")
            if pair.subset != subset:
                stats.filtered_subset += 1
                continue
        if pair.chosen == pair.rejected:
            stats.dropped_identical += 1
            continue
        out.append(pair)
        key = pair.subset or "unlabelled"
        stats.by_subset[key] = stats.by_subset.get(key, 0) + 1
    stats.kept = len(out)
    if not out:
        why = f" after keeping subset={subset}" if subset != "all" else ""
        why += f" ({stats.dropped_identical} dropped with chosen == rejected)" if stats.dropped_identical else ""
        why += f" ({stats.skipped_invalid} skipped as invalid, the first: {stats.first_invalid})" \
            if stats.skipped_invalid else ""
        raise UserError(f"{label}: no preference pairs{why}")
    if stats.skipped_invalid:
        log.warning("%s: skipped %d of %d records as invalid (skip_invalid); the first: %s",
                    label, stats.skipped_invalid, stats.rows, stats.first_invalid)
    return out, stats


def split_holdout(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded (train, held-out) split for user data that came without an eval file."""
    if len(pairs) < 2:
        raise UserError(f"only {len(pairs)} pair(s): too few to hold any out for evaluation "
                        f"(give reward.eval_data)")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(pairs) - 1, max(1, math.ceil(fraction * len(pairs))))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def has_splits(source: str | Path) -> bool:
    """Whether `source` names a dataset with splits (a hub name, a DatasetDict, a data folder).

    A JSONL file or a single saved `Dataset` has no held-out split of its own.
    """
    path = Path(str(source)).expanduser()
    if path.is_file():
        return False
    if path.is_dir():
        return not ((path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file())
    return True


# --------------------------------------------------------------------------------------------------
# Reading rows


def _read_rows(source: str | Path, split: str) -> tuple[list[dict[str, Any]], str]:
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return read_jsonl(path), str(path)
    if path.is_dir():
        return _read_hf(text, split, local=True)
    looks_local = text.startswith((".", "/", "~")) or text.endswith((".jsonl", ".json")) or text.count("/") > 1
    if looks_local:
        raise UserError(f"{text}: file not found")
    return _read_hf(text, split, local=False)


def _read_hf(name: str, split: str, local: bool) -> tuple[list[dict[str, Any]], str]:
    """A `save_to_disk` folder, a local dataset folder, or a hub dataset (offline: from the cache)."""
    import datasets

    label = f"{name}[{split}]"
    try:
        if local and ((Path(name) / "dataset_info.json").is_file() or (Path(name) / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{name}: no split '{split}' (has: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if local else " (offline: the dataset must be in the local Hugging Face cache)"
        raise UserError(f"{label}: cannot load dataset{hint}: {msg}") from None
    rows = []
    for i, row in enumerate(ds, 1):
        rows.append({**row, "_line": f"row {i}"})
    return rows, label


# --------------------------------------------------------------------------------------------------
# One record -> one Pair


def _to_pair(row: dict[str, Any], at: str, fmt: ChatFormat = HH) -> Pair:
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise UserError(f"{at}: missing field '{key}'")
    prompt = row.get("prompt")
    c_prompt, chosen = _prompt_response(prompt, row["chosen"], at, "chosen", fmt)
    r_prompt, rejected = _prompt_response(prompt, row["rejected"], at, "rejected", fmt)
    if c_prompt != r_prompt:
        raise UserError(f"{at}: 'chosen' and 'rejected' have different prompts (they must differ only in "
                        f"the last Assistant turn)")
    return Pair(c_prompt, chosen, rejected, _subset(row, at), _margin(row, at),
                _safe(row, at, "chosen_safe"), _safe(row, at, "rejected_safe"))


def _prompt_response(prompt: Any, answer: Any, at: str, name: str, fmt: ChatFormat = HH) -> tuple[str, str]:
    """(prompt, answer) in any accepted shape -> messages -> rendered by `fmt` and split."""
    if isinstance(answer, str):
        if prompt is None:
            transcript = answer
        elif isinstance(prompt, str) and is_transcript(prompt):
            transcript = prompt + answer
        elif isinstance(prompt, str):  # TRL standard: a plain question, answered by `answer`
            transcript = render([Message("user", prompt), Message("assistant", answer)], add_generation_prompt=False)
        else:
            raise UserError(f"{at}: field 'prompt' is a message list but '{name}' is a string; use the same "
                            f"format for both")
        messages = _parse(transcript, at, name)
    elif isinstance(answer, list):
        head: list[Message] = []
        if isinstance(prompt, list):
            head = messages_from_list(prompt, at, "prompt")
        elif prompt is not None:
            raise UserError(f"{at}: field '{name}' is a message list but 'prompt' is not; use the same "
                            f"format for both")
        messages = fold_system(head + messages_from_list(answer, at, name), at, name)
    else:
        raise UserError(f"{at}: field '{name}' must be a transcript string or a list of messages, "
                        f"got {type(answer).__name__}")
    if not any(m.role == "assistant" for m in messages):
        raise UserError(f"{at}: field '{name}' has no Assistant turn")
    if messages[-1].role != "assistant":
        raise UserError(f"{at}: field '{name}' does not end with an Assistant turn")
    if messages[0].role != "user":
        raise UserError(f"{at}: field '{name}' must start with a Human (user) turn")
    try:
        return fmt.prompt_response(messages)
    except ValueError as err:  # a template that refuses the conversation
        raise UserError(f"{at}: field '{name}': {err}") from None


def is_transcript(text: str) -> bool:
    """Whether a prompt string already is an HH transcript (else it is plain text: one Human turn)."""
    return text.lstrip("\n").startswith(HUMAN.strip())


def _parse(transcript: str, at: str, name: str) -> list[Message]:
    if "\n\nAssistant:" not in transcript and not transcript.lstrip("\n").startswith("Assistant:"):
        raise UserError(f"{at}: field '{name}' has no Assistant turn")
    try:
        return parse(transcript)
    except ValueError as err:
        raise UserError(f"{at}: field '{name}': {err}") from None


def messages_from_list(items: list[Any], at: str, name: str) -> list[Message]:
    out = []
    for j, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{at}: field '{name}'[{j}] must be {{\"role\": str, \"content\": str}}")
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"{at}: field '{name}'[{j}]: unknown role {m['role']!r} "
                            f"(expected system, user or assistant)")
        out.append(Message(m["role"], m["content"]))  # type: ignore[arg-type]
    return out


def fold_system(messages: list[Message], at: str, name: str) -> list[Message]:
    """A base model's transcript has no system slot: prepend it to the first user turn."""
    if not messages or messages[0].role != "system":
        if any(m.role == "system" for m in messages):
            raise UserError(f"{at}: field '{name}': a system message is only allowed first")
        return messages
    system, rest = messages[0], messages[1:]
    if any(m.role == "system" for m in rest):
        raise UserError(f"{at}: field '{name}': only one system message is allowed")
    if not rest or rest[0].role != "user":
        raise UserError(f"{at}: field '{name}': a system message must be followed by a user turn")
    first = Message("user", f"{system.content.strip()}\n\n{rest[0].content.strip()}")
    return [first, *rest[1:]]


def _subset(row: dict[str, Any], at: str) -> str | None:
    value = row.get("subset")
    if value is None:
        return None
    if value not in ("helpful", "harmless"):
        raise UserError(f"{at}: field 'subset' must be 'helpful' or 'harmless', got {value!r}")
    return value


def _safe(row: dict[str, Any], at: str, name: str) -> bool | None:
    value = row.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise UserError(f"{at}: field '{name}' must be true or false, got {value!r}")


def _margin(row: dict[str, Any], at: str) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{at}: field 'margin' must be a finite number, got {value!r}")
    return float(value)
