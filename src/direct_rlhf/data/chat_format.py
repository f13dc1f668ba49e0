"""How a conversation becomes the text a *base* model sees, and where a response ends.

A base model has no chat template, so we use the Anthropic HH-RLHF transcript format that the
preference data already speaks:

    "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2 plus 3?\n\nAssistant:"

A base model does not know when to stop: after its answer it happily writes the next
"\n\nHuman:" turn itself. So a response *ends* at EOS or at the first end-of-turn marker, and
everything from the marker on is cut. Every stage (pretraining corpus, reward model, PPO rollout,
SFT, evaluation, chat) goes through this one module so that they agree on the bytes. A model that
has a chat template of its own may use it instead (`model.chat_format=template`, `ChatFormat`).

The *token* layout is decided here too (`special_wrapping`, `prompt_ids`): every role
sees text wrapped in the special tokens the tokenizer adds (Llama's and Mistral's BOS), as the model
saw in pretraining. A prompt that a model continues gets only the leading ones (a trailing EOS would
end the text before the answer); a whole text that is scored or trained on gets both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


def truncate_at_end_of_turn(response: str, markers: Sequence[str] = END_OF_TURN) -> tuple[str, bool]:
    """Cut a generated response at the first end-of-turn marker (`markers`: a chat format's
    `stop_strings`; the HH ones by default).

    Returns (response, ended): `ended` is True when a marker was found, i.e. the model stopped
    its turn by itself. EOS is handled on token ids by the caller.
    """
    cut = _next_marker(response, 0, markers)
    if cut < len(response):
        return response[:cut], True
    return response, False


def _next_marker(text: str, start: int, markers: Sequence[str] = END_OF_TURN) -> int:
    hits = [i for i in (text.find(m, start) for m in markers) if i >= 0]
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



# --------------------------------------------------------------------------------------------------
# The chat format of a model (`model.chat_format`): HH transcripts, or the tokenizer's own template

FormatName = Literal["hh", "template"]

# A conversation that shows a template's shape: where the assistant's text ends and what follows it.
_PROBE = (Message("user", "direct-rlhf probe question"), Message("assistant", "direct-rlhf probe answer"))


@dataclass(frozen=True)
class ChatFormat:
    """How one model's conversations become text, and where its responses end.

    `hh` (the default, and the paper's: a base model has no template) is the transcript above.
    `template` is the tokenizer's own chat template (`apply_chat_template`), for a model that has
    one: a prompt is the template's rendering with its generation prompt; a (prompt, response) pair
    splits the rendering with the assistant message included at the generation prompt, and the
    response stops before the template's end of turn. That end is a *token*, as the HH marker is:
    SFT appends EOS, PPO samples it, so the reward model scores the same text in training and in
    PPO. A response also ends at a template end-of-turn string that is not EOS (Llama-3's
    <|eot_id|>, SmolLM2 base's <|im_end|>), and at an HH marker, as with `hh`.

    BOS: the token layout (`prompt_ids`, the reward model's `encode`) adds the tokenizer's leading
    special tokens to every text, so a leading BOS the template writes itself ("<s>", "<|begin_of_text|>") is cut
    from its output (`bos_text`); a template's BOS that the tokenizer does not add stays in the text
    and is tokenised as the special token it is. Either way BOS appears once.

    Build one with `chat_format` (a template needs the tokenizer) and pass it explicitly.
    """

    name: FormatName = "hh"
    tokenizer: Any = field(default=None, repr=False, compare=False)
    stop_strings: tuple[str, ...] = END_OF_TURN   # where a generated response ends besides EOS
    bos_text: str = ""                            # cut from the start of the template's output
    end_of_turn: str = ""                         # what the template writes after an assistant's text

    def prompt(self, messages: Sequence[Message | dict]) -> str:
        """A conversation ending with a user turn -> the text a model continues with its answer."""
        if self.name == "hh":
            return render(messages)
        return self._template(messages, add_generation_prompt=True)

    def prompt_response(self, messages: Sequence[Message | dict]) -> tuple[str, str]:
        """A conversation ending with an assistant turn -> (prompt, response), as the reward model
        and SFT see them. Raises ValueError when the template cannot split it."""
        if self.name == "hh":
            return split_prompt_response(render(messages, add_generation_prompt=False))
        prompt = self._template(messages[:-1], add_generation_prompt=True)
        full = self._template(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the earlier turns differently once the last assistant "
                             "turn is added, so the response cannot be split off (use model.chat_format=hh)")
        response = full[len(prompt):]
        ends = [e for e in (self.end_of_turn, self.tokenizer.eos_token) if e]
        cut = min((i for i in (response.find(e) for e in ends) if i >= 0), default=len(response))
        return prompt, response[:cut]

    def from_transcript(self, transcript: str) -> str:
        """An HH prompt (ending in an open Assistant turn, as prompt files and preference pairs give
        them) -> this format's prompt."""
        if self.name == "hh":
            return transcript
        return self.prompt(prompt_messages(transcript))

    def truncate(self, response: str) -> tuple[str, bool]:
        """`truncate_at_end_of_turn` with this format's end-of-turn strings."""
        return truncate_at_end_of_turn(response, self.stop_strings)

    def _template(self, messages: Sequence[Message | dict], add_generation_prompt: bool) -> str:
        msgs = [{"role": m.role, "content": m.content} if isinstance(m, Message) else dict(m) for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja's TemplateError, a template's raise_exception(...)
            raise ValueError(f"the chat template refused the conversation: {str(err).strip() or type(err).__name__}") \
                from None
        return text[len(self.bos_text):] if self.bos_text and text.startswith(self.bos_text) else text


HH = ChatFormat()


def prompt_messages(transcript: str) -> list[Message]:
    """An HH prompt -> its messages, without the open Assistant turn it ends with."""
    messages = parse(transcript)
    if messages and messages[-1].role == "assistant" and not messages[-1].content:
        messages = messages[:-1]
    if not messages or messages[-1].role != "user":
        raise ValueError("prompt does not end with a Human turn and an open 'Assistant:' turn")
    return messages


def chat_format(name: str, tokenizer: Any = None, model: str = "the model",
                key: str = "model.chat_format") -> ChatFormat:
    """The chat format `name` for `model`'s tokenizer: `hh` needs none; `template` needs a tokenizer
    that has a chat template, else a one-line `UserError` naming the model and `key`."""
    if name == "hh":
        return HH
    if name != "template":
        raise ValueError(f"unknown chat format {name!r}")
    from ..errors import UserError

    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{model}: its tokenizer has no chat template, so {key}=template cannot be used "
                        f"(set {key}=hh, the HH transcript a base model is given)")
    head, _ = special_wrapping(tokenizer)
    fmt = ChatFormat("template", tokenizer, END_OF_TURN, tokenizer.decode(head) if head else "")
    try:
        full = fmt._template(_PROBE, add_generation_prompt=False)
    except ValueError as err:
        raise UserError(f"{model}: {err} (with {key}=template)") from None
    at = full.rfind(_PROBE[-1].content)
    after = full[at + len(_PROBE[-1].content):].split() if at >= 0 else []
    end = after[0] if after else ""  # "<|im_end|>" of "<|im_end|>\n", "</s>", "<|eot_id|>"
    is_eos = not end or bool(tokenizer.eos_token and end.startswith(tokenizer.eos_token))
    return ChatFormat("template", tokenizer, END_OF_TURN if is_eos else (*END_OF_TURN, end), fmt.bos_text, end)
