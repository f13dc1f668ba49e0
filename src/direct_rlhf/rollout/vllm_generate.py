"""Sample PPO rollouts with vLLM on the trainer's GPU (`ppo.rollout_backend=vllm`).

vLLM runs inside this process, colocated with the trainer on its GPU: it takes a fraction
(`ppo.vllm_gpu_memory_utilization`) of the memory for its copy of the weights and its KV cache.
Before each rollout the actor's current weights are copied into vLLM's model, LoRA deltas added
(`actor_weights`); vLLM maps Hugging Face parameter names onto its fused layers itself
(`load_weights`). Its engine core stays in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
the copy is a device-to-device copy of tensors passed by reference, not a serialisation.

Responses are cut with the same `cut_response` as the Hugging Face path, so the end-of-turn rules
(stop token kept, text cut before the marker) are identical. vLLM's log-probs are not used: its
kernels and sampler differ numerically from the training forward pass, and PPO's ratio must
compare the training forward with itself, so the trainer recomputes the old log-probs
(`Samples.logprobs` is None).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch

from ..data.chat_format import END_OF_TURN, prompt_ids
from ..errors import UserError
from .hf_generate import Samples
from .policy_weights import actor_weights

EXTENSION = f"{__name__}.WeightLoader"


class WeightLoader:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`); called through `collective_rpc`."""

    def direct_rlhf_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]


class VLLMSampler:
    """One vLLM engine per training process; `sample` mirrors `hf_generate.sample`."""

    def __init__(self, model_path: str, tokenizer, dtype: str, gpu_memory_utilization: float, seed: int,
                 num_processes: int = 1, llm_factory: Any = None):
        self.tokenizer = tokenizer
        if llm_factory is None:  # the real engine; tests pass a stand-in
            if not torch.cuda.is_available():
                raise UserError("ppo.rollout_backend=vllm needs a CUDA GPU (use ppo.rollout_backend=hf on a CPU)")
            try:
                from vllm import LLM
            except ImportError:
                raise UserError("ppo.rollout_backend=vllm needs vLLM: pip install vllm") from None
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            llm_factory = LLM
        kwargs = {"distributed_executor_backend": "external_launcher"} if num_processes > 1 else {}
        self.llm = llm_factory(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
                               gpu_memory_utilization=gpu_memory_utilization,
                               enable_prefix_caching=True, worker_extension_cls=EXTENSION,
                               generation_config="vllm",  # not the model's generation_config.json (hf_generate)
                               **kwargs)

    def load_weights(self, actor: torch.nn.Module) -> None:
        """Copy the actor's current weights into vLLM, and forget KV blocks cached from the old ones."""
        self.llm.collective_rpc("direct_rlhf_load_weights", args=(actor_weights(actor),))
        self.llm.reset_prefix_cache()

    def sample(self, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, stop_strings: Sequence[str] = END_OF_TURN) -> Samples:
        """`stop_strings`: as `hf_generate.sample`'s (the chat format's end-of-turn strings)."""
        from vllm import SamplingParams

        tok = self.tokenizer
        params = SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                stop=list(stop_strings), include_stop_str_in_output=True,
                                stop_token_ids=[tok.eos_token_id], skip_special_tokens=False)
        ids = prompt_ids(tok, prompts)
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        return samples_from_outputs(tok, prompts, outs, stop_strings)


def samples_from_outputs(tokenizer, prompts: list[str], outs: list[Any],
                         stop_strings: Sequence[str] = END_OF_TURN) -> Samples:
    """vLLM RequestOutputs -> Samples, cut exactly as the Hugging Face path cuts."""
    out = Samples(prompts=list(prompts), texts=[], response_ids=[], ended=[])
    for o in outs:
        c = o.outputs[0]
        row = list(c.token_ids)
        if c.finish_reason == "stop" and c.stop_reason is None and row[-1:] != [tokenizer.eos_token_id]:
            row.append(tokenizer.eos_token_id)  # stopped at EOS without returning it: keep it, as generate does
        out.add(tokenizer, row, stop_strings)
    return out
