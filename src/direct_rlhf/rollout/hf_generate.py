"""Sample responses with Hugging Face `generate`, stopping at EOS or the chat format's end of turn.

A base model does not stop after its answer; it writes the next "Human:" turn. Each row stops as
soon as it writes an end-of-turn marker (`stop_strings`), and the response is cut there. The token
that opened the marker is kept as the response's last token — it plays the role EOS plays for a
chat model, so PPO can give credit for ending the turn — but the response *text* excludes it.

With `logprobs=True` it also returns each kept token's log-probability under the sampling model
(raw logits / temperature, no top-p), taken from the logits generation computed anyway: PPO's
"old" log-probs then cost no extra forward pass. They are gathered step by step as generation
runs (`TokenLogprobs`), so only one (rows, vocabulary) row of logits is held at a time, not one
per generated token (`output_logits` would hold 64 rows x 256 tokens x 128k vocabulary = 8 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..data.chat_format import END_OF_TURN, truncate_at_end_of_turn
from ..models.attention_kernels import without_cudnn_attention


@dataclass
class Samples:
    prompts: list[str]
    texts: list[str]                 # responses, cut at the end of turn
    response_ids: list[list[int]]    # the tokens the policy produced, through the stop token
    ended: list[bool]                # stopped by itself (EOS or end-of-turn), not by the length limit
    logprobs: list[torch.Tensor] | None = None  # per row, size = (len(response_ids[i]),)

    def add(self, tokenizer, row: list[int]) -> int:
        """Cut one generated row at its end of turn (`cut_response`), append it; returns the kept length."""
        ids, text, ended = cut_response(tokenizer, row)
        self.response_ids.append(ids)
        self.texts.append(text)
        self.ended.append(ended)
        return len(ids)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, batch_size: int = 32, seed: int | None = None, greedy: bool = False,
           logprobs: bool = False) -> Samples:
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = Samples(prompts=list(prompts), texts=[], response_ids=[], ended=[], logprobs=[] if logprobs else None)
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            recorder = TokenLogprobs(temperature) if logprobs else None
            with without_cudnn_attention(model.device):  # a new key length every token
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                    temperature=temperature if not greedy else None, top_p=top_p if not greedy else None,
                    top_k=0 if not greedy else None, stop_strings=list(END_OF_TURN), tokenizer=tokenizer,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                    logits_processor=LogitsProcessorList([recorder]) if recorder else None,
                )
            new = gen[:, enc["input_ids"].shape[1]:]  # size = (b, S)
            lp = recorder.finish(new) if recorder else None
            for i, row in enumerate(new.tolist()):
                kept = out.add(tokenizer, row)
                if lp is not None:
                    out.logprobs.append(lp[i, :kept].cpu())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return out


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


def cut_response(tokenizer, ids: list[int]) -> tuple[list[int], str, bool]:
    """(kept token ids, response text, ended) for one generated row (right-padded with PAD)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
        text, _ = truncate_at_end_of_turn(tokenizer.decode(ids[:-1]))
        return ids, text, True
    while ids and ids[-1] == pad and pad != eos:
        ids = ids[:-1]
    full = tokenizer.decode(ids)
    text, ended = truncate_at_end_of_turn(full)
    if not ended:
        return ids, text, False
    # keep tokens through the one whose text crosses into the marker. Generation stops as soon as
    # the marker is complete, so that token is among the last few: walk back from the end (from the
    # start, a 256-token row took 256 decodes of up to 256 tokens, 6 ms a row)
    k = len(ids)
    while k > 1 and len(tokenizer.decode(ids[:k - 1])) > len(text):
        k -= 1
    return ids[:k], text, True
