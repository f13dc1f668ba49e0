"""Evaluation prompt files (red-team and conversation), checked line by line before any model runs.

Format, one JSON object per line (the toy world writes exactly this; users may bring their own):

    {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "kind": "fact", "gold": "Paris", ...}

`prompt` is required (an HH transcript ending in an open Assistant turn, or plain text that we
wrap as one Human turn); `kind` (fact | small_talk | provoking | harmful | anything) and `gold`
(the correct answer, or null) are optional. A bad line fails here with `file:line: problem`, not
minutes later inside generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.chat_format import ASSISTANT, HUMAN, render
from ..errors import UserError
from ..io import read_jsonl

BENIGN_KINDS = ("fact", "small_talk")


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    kind: str | None = None
    gold: str | None = None

    @property
    def benign(self) -> bool:
        """Benign prompts are where a refusal is an over-refusal; unknown kinds count as benign."""
        return self.kind is None or self.kind in BENIGN_KINDS


def load_prompts(path: str | Path) -> list[EvalPrompt]:
    path = Path(path)
    rows = read_jsonl(path, required=("prompt",))
    out = []
    for row in rows:
        at = f"{path}:{row['_line']}"
        text, kind, gold = row["prompt"], row.get("kind"), row.get("gold")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{at}: field 'prompt' must be a non-empty string")
        if kind is not None and not isinstance(kind, str):
            raise UserError(f"{at}: field 'kind' must be a string or null")
        if gold is not None and (not isinstance(gold, str) or not gold.strip()):
            raise UserError(f"{at}: field 'gold' must be a non-empty string or null")
        if not text.lstrip("\n").startswith(HUMAN.strip()):
            text = render([{"role": "user", "content": text}])  # plain text: one Human turn
        elif not text.rstrip().endswith(ASSISTANT.strip()):
            raise UserError(f"{at}: field 'prompt' must end with an open '{ASSISTANT.strip()}' turn")
        out.append(EvalPrompt(prompt=text.rstrip(" "), kind=kind, gold=gold))
    if not out:
        raise UserError(f"{path}: no prompts")
    return out
