"""Prompts cut to fit the model, keeping the end of the conversation.

Nothing else bounds a prompt's length: a prompt file holding one pasted chat log of 3000 turns made
`direct-rlhf ppo` grow to 24 GB and be killed, since generation, the reference, the critic and the
reward model all run over the whole prompt, every step. So PPO's and the evaluation's prompts are
cut once, where they are loaded, to a budget of tokens: `ppo.max_prompt_len` (`eval.max_prompt_len`),
and never more than the model's context (`max_position_embeddings`) leaves after `max_new_tokens`
of response and the special tokens the tokenizer adds.

The rule (the end is what the model answers, so the end is kept):

1. a prompt that fits is kept byte for byte;
2. otherwise its oldest turns go, whole: what is kept is the longest tail that starts at a
   "Human:" turn and fits, so it still starts with "\\n\\nHuman:" and ends with the open
   "\\n\\nAssistant:" turn;
3. when even the last Human turn alone does not fit, that turn's text keeps its last tokens,
   between its "Human:" tag and the open "Assistant:" turn.

Counting is done with the tokenizer of the model that will read the prompt.

With `model.chat_format=template` the prompts (HH transcripts, as every loader gives them) become
messages, are cut by the same rule on the message list (whole oldest turns, each tail starting at a
user turn; then the last user turn's last tokens), and are rendered with the model's chat template
here, where its tokenizer is loaded (`render_prompts`).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..errors import UserError
from .chat_format import ASSISTANT, HH, HUMAN, ChatFormat, Message, chat_format, prompt_messages

log = logging.getLogger("direct_rlhf")

# A budget below this cannot hold the two tags and a few words of a question.
MIN_TEXT_TOKENS = 8


def context_length(model_config: Any) -> int | None:
    """The positions a model can attend over, when its config says (Llama/Mistral/Qwen/GPT-NeoX:
    max_position_embeddings; GPT-2: n_positions); None when it does not."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def special_token_count(tokenizer: Any) -> int:
    """How many special tokens (BOS, EOS) the tokenizer adds around a text."""
    return max(0, len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"]))


def prompt_budget(tokenizer: Any, max_prompt_len: int, max_new_tokens: int, context: int | None,
                  section: str, fmt: ChatFormat = HH) -> int:
    """The tokens a prompt's text may take: `max_prompt_len`, and what the context leaves after the
    response and the special tokens. `section` ("ppo", "eval") names the keys in the error; `fmt`
    frames a turn (HH tags, or the model's template)."""
    budget, why = max_prompt_len, f"{section}.max_prompt_len"
    if context is not None and context - max_new_tokens - special_token_count(tokenizer) < budget:
        budget = context - max_new_tokens - special_token_count(tokenizer)
        why = f"the model's context of {context} tokens less {section}.max_new_tokens={max_new_tokens}"
    frame = HUMAN + ASSISTANT if fmt.name == "hh" else fmt.prompt([Message("user", "")])
    if budget < _tokens(tokenizer, frame) + MIN_TEXT_TOKENS:
        raise UserError(f"{section}: a prompt may take only {budget} tokens ({why}), too few for one Human turn; "
                        f"raise {section}.max_prompt_len or lower {section}.max_new_tokens")
    return budget


def truncate_prompts(prompts: Sequence[str], tokenizer: Any, budget: int) -> tuple[list[str], int]:
    """Every prompt cut to `budget` tokens by the rule above; returns (prompts, how many were cut)."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    out = [p if n <= budget else _cut(p, tokenizer, budget) for p, n in zip(prompts, lengths)]
    return out, sum(n > budget for n in lengths)


def truncate_prompt(prompt: str, tokenizer: Any, budget: int) -> str:
    """One prompt cut to `budget` tokens (unchanged when it fits)."""
    return truncate_prompts([prompt], tokenizer, budget)[0][0]


def fit_prompts(prompts: Sequence[str], model: str, trust_remote_code: bool, max_prompt_len: int,
                max_new_tokens: int, section: str, chat_format_name: str = "hh") -> tuple[list[str], int, int]:
    """`prompts` cut for `model` (a folder or hub id; its tokenizer and config are read, not its
    weights); returns (prompts, how many were cut, the budget in tokens), and says what it cut.
    `chat_format_name` (model.chat_format): with `template` the HH prompts come back rendered with
    `model`'s chat template (`render_prompts`)."""
    from transformers import AutoConfig

    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(model, trust_remote_code)
    try:
        context = context_length(AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code))
    except (OSError, ValueError, KeyError):
        context = None  # not a model config we can read: max_prompt_len alone bounds the prompts
    fmt = chat_format(chat_format_name, tokenizer, str(model))
    budget = prompt_budget(tokenizer, max_prompt_len, max_new_tokens, context, section, fmt)
    if fmt.name == "hh":
        out, n_cut = truncate_prompts(prompts, tokenizer, budget)
    else:
        out, n_cut = render_prompts(prompts, fmt, tokenizer, budget)
    if n_cut:
        log.warning("%s: %d of %d prompts were longer than %d tokens; their oldest turns were dropped "
                    "(%s.max_prompt_len)", section, n_cut, len(out), budget, section)
    return out, n_cut, budget


def render_prompts(transcripts: Sequence[str], fmt: ChatFormat, tokenizer: Any, budget: int) -> tuple[list[str], int]:
    """HH prompts rendered with `fmt` (a model's chat template), each cut to `budget` tokens by the
    rule above applied to its messages; returns (prompts, how many were cut)."""
    conversations, texts = [], []
    for i, transcript in enumerate(transcripts, 1):
        try:
            messages = prompt_messages(transcript)
            conversations.append(messages)
            texts.append(fmt.prompt(messages))
        except ValueError as err:
            raise UserError(f"prompt {i} ({transcript[:40]!r}...): {err}") from None
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    out = [t if n <= budget else fmt.prompt(_cut_messages(m, fmt, tokenizer, budget))
           for t, n, m in zip(texts, lengths, conversations)]
    return out, sum(n > budget for n in lengths)


def _cut_messages(messages: list[Message], fmt: ChatFormat, tokenizer: Any, budget: int) -> list[Message]:
    """The longest tail starting at a user turn that fits (found by bisection: a shorter tail never
    renders longer, and a 3000-turn chat log is rendered a dozen times, not 3000), else the last
    user turn keeping its last tokens."""
    starts = [i for i, m in enumerate(messages) if m.role == "user" and i > 0]
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if _tokens(tokenizer, fmt.prompt(messages[starts[mid]:])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(starts):
        return messages[starts[lo]:]
    ids = tokenizer(messages[-1].content, add_special_tokens=False)["input_ids"]
    keep = max(1, budget - _tokens(tokenizer, fmt.prompt([Message("user", "")])))
    while True:
        # a cut inside a character's bytes decodes as U+FFFD: drop the partial character
        text = tokenizer.decode(ids[-keep:] if keep else [], skip_special_tokens=True).lstrip("\ufffd").strip()
        out = [Message("user", text)]
        excess = _tokens(tokenizer, fmt.prompt(out)) - budget
        if excess <= 0 or keep == 0:
            return out
        keep = max(0, keep - excess)


# --------------------------------------------------------------------------------------------------


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cut(prompt: str, tokenizer: Any, budget: int) -> str:
    # where each Human turn after the first starts: the places a tail may begin
    starts = [i for i in _find_all(prompt, HUMAN) if i > 0]
    if starts:
        # estimated from each turn's own count (one batch call, linear in the prompt), then checked
        # exactly from one turn more than the estimate keeps, dropping turns while it does not fit
        pieces = [prompt[a:b] for a, b in zip(starts, starts[1:] + [len(prompt)])]
        sizes = [len(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]]
        tail, first = 0, len(starts)
        for k in range(len(starts) - 1, -1, -1):
            tail += sizes[k]
            if tail > budget:
                break
            first = k
        for k in range(max(first - 1, 0), len(starts)):
            if _tokens(tokenizer, prompt[starts[k]:]) <= budget:
                return prompt[starts[k]:]
    return _cut_last_turn(prompt[starts[-1]:] if starts else prompt, tokenizer, budget)


def _cut_last_turn(turn: str, tokenizer: Any, budget: int) -> str:
    """One Human turn (and the open Assistant turn after it) too long on its own: keep the last
    tokens of its text."""
    body_start = turn.find(HUMAN.strip()) + len(HUMAN.strip())
    open_turn = turn.rfind(ASSISTANT)
    open_turn = open_turn if open_turn >= body_start else len(turn)
    ids = tokenizer(turn[body_start:open_turn].strip(), add_special_tokens=False)["input_ids"]
    frame = _tokens(tokenizer, HUMAN + " " + turn[open_turn:])
    keep = max(1, budget - frame)
    while True:
        # a cut inside a character's bytes decodes as U+FFFD: drop the partial character
        text = tokenizer.decode(ids[-keep:] if keep else [], skip_special_tokens=True).lstrip("\ufffd").strip()
        out = f"{HUMAN} {text}{turn[open_turn:]}"
        excess = _tokens(tokenizer, out) - budget
        if excess <= 0 or keep == 0:
            return out
        keep = max(0, keep - excess)


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out
