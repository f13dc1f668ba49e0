"""How a conversation becomes the text a *base* model sees, and where a response ends.

A base model has no chat template, so we use the Anthropic HH-RLHF transcript format that the
preference data already speaks:

    "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2 plus 3?\n\nAssistant:"

A base model does not know when to stop: after its answer it happily writes the next
"\n\nHuman:" turn itself. So a response *ends* at EOS or at the first end-of-turn marker, and
everything from the marker on is cut. Every stage (pretraining corpus, reward model, PPO rollout,
SFT, evaluation, chat) goes through this one module so that they agree on the bytes.

The *token* layout is decided here too (`special_wrapping`, `prompt_ids`): every role
sees text wrapped in the special tokens the tokenizer adds (Llama's and Mistral's BOS), as the model
saw in pretraining. A prompt that a model continues gets only the leading ones (a trailing EOS would
end the text before the answer); a whole text that is scored or trained on gets both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
# Markers that end an assistant turn when the model writes them itself.
END_OF_TURN = (HUMAN, ASSISTANT)

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


def render(messages: Iterable[Message | dict], add_generation_prompt: bool = True) -> str:
    """Conversation -> transcript. With `add_generation_prompt`, end with an open Assistant turn."""
    parts = []
    for m in messages:
        m = m if isinstance(m, Message) else Message(m["role"], m["content"])
        tag = HUMAN if m.role == "user" else ASSISTANT
        parts.append(f"{tag} {m.content.strip()}")
    text = "".join(parts)
    if add_generation_prompt:
        text += ASSISTANT
    return text


def parse(transcript: str) -> list[Message]:
    """Transcript -> messages (inverse of `render(..., add_generation_prompt=False)`).

    Raises ValueError when the text does not start with a Human turn; callers add file and line.
    """
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip("\n")
    if not text.startswith(HUMAN):
        raise ValueError("transcript does not start with a 'Human:' turn")
    messages: list[Message] = []
    pos = 0
    while pos < len(text):
        tag = HUMAN if text.startswith(HUMAN, pos) else ASSISTANT
        start = pos + len(tag)
        nxt = _next_marker(text, start)
        content = text[start:nxt]
        messages.append(Message("user" if tag == HUMAN else "assistant", content.strip()))
        pos = nxt
    return messages


def split_prompt_response(transcript: str) -> tuple[str, str]:
    """Split an HH transcript at its last Assistant turn: (prompt ending in 'Assistant:', response).

    The response keeps its leading space, as a model would generate it after the prompt.
    """
    idx = transcript.rfind(ASSISTANT)
    if idx < 0:
        raise ValueError("transcript has no 'Assistant:' turn")
    cut = idx + len(ASSISTANT)
    return transcript[:cut], transcript[cut:]


def truncate_at_end_of_turn(response: str) -> tuple[str, bool]:
    """Cut a generated response at the first end-of-turn marker.

    Returns (response, ended): `ended` is True when a marker was found, i.e. the model stopped
    its turn by itself. EOS is handled on token ids by the caller.
    """
    cut = _next_marker(response, 0)
    if cut < len(response):
        return response[:cut], True
    return response, False


def _next_marker(text: str, start: int) -> int:
    hits = [i for i in (text.find(m, start) for m in END_OF_TURN) if i >= 0]
    return min(hits) if hits else len(text)


# --------------------------------------------------------------------------------------------------
# Token layout: one rule for every role (reward model, critic, generation, SFT, evaluation, chat)


def special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after any text (e.g. Llama's and Mistral's BOS;
    nothing for GPT-2 or SmolLM2, which add no special tokens)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    return [], []


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts that a model will continue: the leading special tokens, then the text."""
    head, _ = special_wrapping(tokenizer)
    return [head + list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]

