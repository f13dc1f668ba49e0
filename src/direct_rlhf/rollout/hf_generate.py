"""Sample responses with Hugging Face `generate`, stopping at EOS or the chat format's end of turn.

A base model does not stop after its answer; it writes the next "Human:" turn. Each row stops as
soon as it writes an end-of-turn marker (`stop_strings`) or samples EOS. One rule (`cut_response`,
shared with the vLLM backend) decides what a response is: exactly the tokens the policy sampled, up
to and including the token that ended the turn (a sampled EOS, or the token that completed a
marker). Those tokens play the role EOS plays for a chat model, so PPO can give credit for ending
the turn; the response *text* excludes the marker.

Sampling uses only the caller's settings (`sampling_config`), never the model's own
`generation_config.json`: a repetition penalty or top-k shipped with a checkpoint would change the
distribution the tokens are drawn from, and the log-probs recorded here would no longer be the
ones training computes. Prompts get the tokenizer's leading special tokens (`chat_format.prompt_ids`).

With `logprobs=True` it also returns each kept token's log-probability under the sampling model
(raw logits / temperature, no top-p), taken from the logits generation computed anyway: PPO's
"old" log-probs then cost no extra forward pass. They are gathered step by step as generation
runs (`TokenLogprobs`), so only one (rows, vocabulary) row of logits is held at a time, not one
per generated token (`output_logits` would hold 64 rows x 256 tokens x 128k vocabulary = 8 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import contextlib
from typing import Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..data.chat_format import END_OF_TURN, prompt_ids, truncate_at_end_of_turn
from ..models.attention_kernels import without_cudnn_attention


@dataclass
class Samples:
    prompts: list[str]
    texts: list[str]                 # responses, cut at the end of turn
    response_ids: list[list[int]]    # the tokens the policy produced, through the stop token
    ended: list[bool]                # stopped by itself (EOS or end-of-turn), not by the length limit
    logprobs: list[torch.Tensor] | None = None  # per row, size = (len(response_ids[i]),)

    def add(self, tokenizer, row: list[int], stop_strings: Sequence[str] = END_OF_TURN) -> int:
        """Cut one generated row at its end of turn (`cut_response`), append it; returns the kept length."""
        ids, text, ended = cut_response(tokenizer, row, stop_strings)
        self.response_ids.append(ids)
        self.texts.append(text)
        self.ended.append(ended)
        return len(ids)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, batch_size: int = 32, seed: int | None = None, greedy: bool = False,
           logprobs: bool = False, stop_strings: Sequence[str] = END_OF_TURN) -> Samples:
    """`stop_strings`: where a response ends besides EOS, the chat format's (`ChatFormat.stop_strings`)."""
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = Samples(prompts=list(prompts), texts=[], response_ids=[], ended=[], logprobs=[] if logprobs else None)
    config = sampling_config(tokenizer, max_new_tokens, temperature, top_p, greedy, stop_strings)
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            input_ids, attention_mask = left_pad(prompt_ids(tokenizer, chunk), tokenizer.pad_token_id)
            recorder = TokenLogprobs(temperature) if logprobs else None
            # cuDNN's attention left out: a new key length every token
            with without_cudnn_attention(model.device), only_this_config(model, config):
                gen = model.generate(
                    input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                    generation_config=config, tokenizer=tokenizer,
                    logits_processor=LogitsProcessorList([recorder]) if recorder else None,
                )
            new = gen[:, input_ids.shape[1]:]  # size = (b, S)
            lp = recorder.finish(new) if recorder else None
            for i, row in enumerate(new.tolist()):
                kept = out.add(tokenizer, row, stop_strings)
                if lp is not None:
                    out.logprobs.append(lp[i, :kept].cpu())
    finally:
        model.train(was_training)
    return out


def sampling_config(tokenizer, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                    greedy: bool = False, stop_strings: Sequence[str] = END_OF_TURN) -> GenerationConfig:
    """Exactly the recipe's sampling settings: plain temperature and top-p, no top-k, no penalties."""
    common = {"max_new_tokens": max_new_tokens, "stop_strings": list(stop_strings),
              "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, "use_cache": True}
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)


@contextlib.contextmanager
def only_this_config(model, config: GenerationConfig) -> Iterator[None]:
    """Make `config` the model's own generation config for the call: `generate` fills every setting
    left at its global default (repetition_penalty=1.0, top_k=50 ...) from the model's own config,
    so passing `generation_config=` alone would let a checkpoint's settings back in."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = hf_model.generation_config
    hf_model.generation_config = config
    try:
        yield
    finally:
        hf_model.generation_config = saved


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to the longest: (input_ids, attention_mask), each size = (B, T)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


class TokenLogprobs(LogitsProcessor):
    """Records log softmax(logits_t / T)[token_t] for each generated step while `generate` runs.

    Custom processors run before generation's own temperature and top-p warpers, so each call sees
    the raw logits of step t; the token sampled from them is known at the next call (the last
    column of its input ids), or, for the last step, from the finished sequences (`finish`)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []   # per finished step, size = (b,)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # latest step's logits / T, size = (b, V),
                                                                      # and their logsumexp, size = (b,)

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            scaled, lse = self.pending
            self.steps.append(scaled.gather(1, tokens[:, None]).squeeze(1) - lse)
            self.pending = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        scaled = scores.float() / self.temperature
        self.pending = (scaled, torch.logsumexp(scaled, dim=-1))
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Per-step log-probs of the generated tokens; size = (b, S)."""
        self._take(new_tokens[:, -1])
        if len(self.steps) != new_tokens.shape[1]:  # generate always makes at least one token
            raise RuntimeError(f"recorded {len(self.steps)} steps for {new_tokens.shape[1]} generated tokens")
        return torch.stack(self.steps, dim=1)


def cut_response(tokenizer, ids: list[int], stop_strings: Sequence[str] = END_OF_TURN) -> tuple[list[int], str, bool]:
    """(kept token ids, response text, ended) for one generated row, right-padded with PAD.

    The kept ids are exactly the tokens the policy sampled, through the token that ended the turn:
    a sampled EOS, or the token that completed an end-of-turn marker, whichever came first. The
    first EOS ends the row for certain: after it there is only padding (and PAD is often EOS:
    Llama and Mistral have no PAD, SmolLM2 ships PAD == EOS). So a row that stopped on a marker
    and was then padded keeps its marker and no EOS the policy never sampled. The markers are
    `stop_strings` (the chat format's: the HH ones, and a template's end-of-turn text that is not EOS)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampled_eos = eos in ids
    body = ids[:ids.index(eos)] if sampled_eos else list(ids)
    while not sampled_eos and body and body[-1] == pad:
        body.pop()  # a distinct PAD after a marker
    text, ended = truncate_at_end_of_turn(tokenizer.decode(body), stop_strings)
    if ended:
        # the token that completed the marker: the shortest prefix whose text holds a marker. Generation
        # stops right there, so walk back from the end (from the start, a 256-token row took 256 decodes)
        k = len(body)
        while k > 1 and truncate_at_end_of_turn(tokenizer.decode(body[:k - 1]), stop_strings)[1]:
            k -= 1
        return body[:k], text, True
    if sampled_eos:
        return body + [eos], text, True
    return body, text, False
