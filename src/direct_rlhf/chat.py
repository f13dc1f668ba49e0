"""`direct-rlhf chat MODEL_DIR`: talk to any causal-LM folder, in the chat format of every stage.

Reads user turns from stdin (a terminal or a pipe), one per line; `/reset` starts over and
`/quit` (or end of input) leaves. The history is rendered in the chat format (`--chat-format`: the
HH transcript, or the model's own chat template), and the reply is cut at the model's own next turn
exactly as in PPO and evaluation.
"""

from __future__ import annotations

import sys
from typing import TextIO

from .data.chat_format import Message, chat_format
from .models.loading import load_causal_lm, load_tokenizer
from .rollout.hf_generate import sample


def chat(model_dir: str, max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.9,
         seed: int = 0, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, trust_remote_code: bool = False,
         chat_format_name: str = "hh") -> int:
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    fmt = chat_format(chat_format_name, tokenizer, model_dir, key="--chat-format")  # before the weights load
    model = load_causal_lm(model_dir, trust_remote_code=trust_remote_code)
    interactive = stdin.isatty()
    history: list[Message] = []
    turns = 0
    if interactive:
        print(f"chatting with {model_dir} (/reset to start over, /quit to leave)", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return turns
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            continue
        history.append(Message("user", text))
        out = sample(model, tokenizer, [fmt.prompt(history)], max_new_tokens, temperature, top_p,
                     batch_size=1, seed=seed + turns, greedy=temperature == 0, stop_strings=fmt.stop_strings)
        reply = out.texts[0].strip()
        history.append(Message("assistant", reply))
        turns += 1
        print(f"assistant> {reply}", file=stdout, flush=True)
