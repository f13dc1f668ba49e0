"""Prompt files (PPO training prompts, red-team and conversation evaluation sets), checked line by
line before any model runs.

Format, one JSON object per line (the toy world writes exactly this; users may bring their own):

    {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "kind": "fact", "gold": "Paris", ...}

`prompt` is required, in any of three shapes, all turned into the one transcript every stage
uses (`chat_format`): an HH transcript ending in an open Assistant turn; plain text, wrapped as
one Human turn; or a TRL-style list of `{"role", "content"}` messages ending with a user turn (a
system message first is folded into the first user turn, as for preference data). `kind`
(fact | small_talk | provoking | harmful | anything) and `gold` (the correct answer, or null) are
optional and used by evaluation only. A bad line fails here with `file:line: problem`, not
minutes later inside generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import read_jsonl
from .chat_format import ASSISTANT, render
from .preferences import fold_system, is_transcript, messages_from_list

BENIGN_KINDS = ("fact", "small_talk")


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    kind: str | None = None
    gold: str | None = None

    @property
    def benign(self) -> bool:
        """Benign prompts are where a refusal is an over-refusal: those with no kind, or a kind in
        BENIGN_KINDS; any other kind (a custom one too) is left out of the over-refusal rate."""
        return self.kind is None or self.kind in BENIGN_KINDS


def load_prompts(path: str | Path) -> list[EvalPrompt]:
    path = Path(path)
    rows = read_jsonl(path, required=("prompt",))
    out = []
    for row in rows:
        at = f"{path}:{row['_line']}"
        kind, gold = row.get("kind"), row.get("gold")
        if kind is not None and not isinstance(kind, str):
            raise UserError(f"{at}: field 'kind' must be a string or null")
        if gold is not None and (not isinstance(gold, str) or not gold.strip()):
            raise UserError(f"{at}: field 'gold' must be a non-empty string or null")
        out.append(EvalPrompt(prompt=_transcript(row["prompt"], at), kind=kind, gold=gold))
    if not out:
        raise UserError(f"{path}: no prompts")
    return out


def prompt_texts(path: str | Path) -> list[str]:
    """Just the transcripts (PPO's prompts)."""
    return [p.prompt for p in load_prompts(path)]


def _transcript(prompt: Any, at: str) -> str:
    if isinstance(prompt, list):
        messages = fold_system(messages_from_list(prompt, at, "prompt"), at, "prompt")
        if not messages or messages[-1].role != "user":
            raise UserError(f"{at}: field 'prompt' must be a message list ending with a user turn")
        return render(messages)
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{at}: field 'prompt' must be a non-empty string or a list of messages")
    if not is_transcript(prompt):
        return render([{"role": "user", "content": prompt}])  # plain text: one Human turn
    if not prompt.rstrip().endswith(ASSISTANT.strip()):
        raise UserError(f"{at}: field 'prompt' must end with an open '{ASSISTANT.strip()}' turn")
    return prompt.rstrip(" ")
