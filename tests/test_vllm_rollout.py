"""The vLLM rollout backend's own logic, on CPU with a stand-in engine (vLLM itself needs a GPU):
weights reach the engine under plain HF names with LoRA merged, responses are cut exactly as the
HF path cuts them, the trainer recomputes old log-probs when the sampler gives none, and a CPU
run asking for vLLM stops with one line."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import torch
from conftest import MICRO
from transformers import AutoModelForCausalLM, AutoTokenizer

from direct_rlhf.cli import main
from direct_rlhf.config import LoraConfig
from direct_rlhf.rollout import hf_generate
from direct_rlhf.rollout.policy_weights import actor_weights
from direct_rlhf.rollout.vllm_generate import EXTENSION, VLLMSampler, WeightLoader, samples_from_outputs
from direct_rlhf.train.ppo_models import load_actor, merged_policy
from test_ppo import PPO_MICRO, _trainer, micro_run  # noqa: F401  (the fixture)


class FakeLLM:
    """Records what the sampler asks of vLLM's LLM; `generate` replays canned completions."""

    def __init__(self, **kwargs):
        self.kwargs, self.loaded, self.resets, self.completions, self.requests = kwargs, None, 0, [], None

    def collective_rpc(self, method, args=()):
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(
            load_weights=lambda weights: setattr(self, "loaded", {n: t.clone() for n, t in weights}))))
        getattr(WeightLoader, method)(worker, *args)  # what vLLM's worker runs

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, requests, params, use_tqdm=False):
        self.requests, self.params = requests, params
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=why, stop_reason=stop)])
                for ids, why, stop in self.completions]


def test_lora_weights_reach_the_engine_merged_under_plain_names(micro_run):  # noqa: F811
    base = str(micro_run / "base")
    actor = load_actor(base, "float32", LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for n, p in actor.named_parameters():
            if "lora_B" in n:
                p.normal_()  # adapters that change the weights
    before = {n: p.clone() for n, p in actor.named_parameters()}
    sampler = VLLMSampler(base, AutoTokenizer.from_pretrained(base), "float32", 0.3, 0, llm_factory=FakeLLM)
    assert sampler.llm.kwargs["worker_extension_cls"] == EXTENSION and "distributed_executor_backend" not in sampler.llm.kwargs
    sampler.load_weights(actor)
    plain = AutoModelForCausalLM.from_pretrained(base)
    merged = dict(merged_policy(load_actor(base, "float32", LoraConfig(enabled=True, r=4, alpha=8))).named_parameters())
    assert set(sampler.llm.loaded) == {n for n, _ in plain.named_parameters()}  # vLLM maps HF names
    for n, p in actor.named_parameters():
        assert torch.equal(p, before[n]), "the actor itself is not touched"
    actor_merged = dict(merged_policy(actor).named_parameters())  # peft's own merge, for reference
    for n, w in sampler.llm.loaded.items():
        torch.testing.assert_close(w, actor_merged[n], rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sampler.llm.loaded[q], merged[q], atol=1e-3)  # a fresh actor's adapters are zero
    assert sampler.llm.resets == 1


def test_full_finetuning_weights_and_responses_cut_like_generate(micro_run):  # noqa: F811
    base = str(micro_run / "base")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert [n for n, _ in actor_weights(model)] == [n for n, _ in model.named_parameters()]
    answer = tok(" Paris.", add_special_tokens=False)["input_ids"]
    marker = tok("\n\nHuman: And Spain?", add_special_tokens=False)["input_ids"]
    outs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=why, stop_reason=stop)])
            for ids, why, stop in [(answer + marker, "stop", "\n\nHuman:"),      # stop string, kept in output
                                   (answer, "stop", None),                      # EOS, not returned
                                   (answer + [tok.eos_token_id], "stop", None),  # EOS, returned
                                   (answer * 3, "length", None)]]
    got = samples_from_outputs(tok, ["p"] * 4, outs)
    want = [hf_generate.cut_response(tok, row) for row in
            (answer + marker, answer + [tok.eos_token_id], answer + [tok.eos_token_id], answer * 3)]
    assert got.response_ids == [w[0] for w in want] and got.texts == [w[1] for w in want]
    assert got.ended == [True, True, True, False] and got.texts[0] == " Paris." and got.logprobs is None


def test_sample_asks_vllm_for_the_ppo_sampling_settings(micro_run, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    base = str(micro_run / "base")
    tok = AutoTokenizer.from_pretrained(base)
    sampler = VLLMSampler(base, tok, "float32", 0.3, 0, num_processes=2, llm_factory=FakeLLM)
    assert sampler.llm.kwargs["distributed_executor_backend"] == "external_launcher"
    sampler.llm.completions = [(tok(" Hi.", add_special_tokens=False)["input_ids"], "length", None)]
    s = sampler.sample(["\n\nHuman: Hello\n\nAssistant:"], max_new_tokens=7, temperature=0.7, top_p=0.9)
    p = sampler.llm.params
    assert (p["max_tokens"], p["temperature"], p["top_p"], p["stop_token_ids"]) == (7, 0.7, 0.9, [tok.eos_token_id])
    assert "\n\nHuman:" in p["stop"] and p["include_stop_str_in_output"]
    assert sampler.llm.requests == [{"prompt_token_ids": tok("\n\nHuman: Hello\n\nAssistant:",
                                                              add_special_tokens=False)["input_ids"]}]
    assert s.texts == [" Hi."]


def test_old_logprobs_are_recomputed_when_the_sampler_gives_none(micro_run, tmp_path, monkeypatch):  # noqa: F811
    trainer = _trainer(micro_run, tmp_path, ["ppo.steps=1"])
    torch.manual_seed(0)
    samples = hf_generate.sample(trainer.acc.unwrap_model(trainer.actor), trainer.tokenizer,
                                 trainer.next_prompts(), 12, logprobs=True)
    score = torch.zeros(len(samples.texts))
    with_lp, _ = trainer.make_experience(samples.prompts, samples, score, None)
    samples.logprobs = None
    recomputed, _ = trainer.make_experience(samples.prompts, samples, score, None)
    assert recomputed.old_logprobs.abs().sum() > 0
    torch.testing.assert_close(recomputed.old_logprobs, with_lp.old_logprobs, atol=1e-4, rtol=0)


def test_vllm_backend_on_a_cpu_is_one_line_exit_2(micro_run, tmp_path, capsys):  # noqa: F811
    code = main(["-q", "ppo", "--out", str(tmp_path / "run"), *MICRO, *PPO_MICRO, f"model.base={micro_run / 'base'}",
                 f"ppo.reward_model={micro_run / 'rm'}", "ppo.rollout_backend=vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ppo.rollout_backend=vllm needs a CUDA GPU" in err[0]
