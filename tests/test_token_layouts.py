"""The token-level rules on the tokenizer layouts real model families use (tests/tokenizer_layouts.py):
where a sampled response ends, that recorded log-probs are the ones training computes, that every
role sees the same BOS layout, and that dropout is off in every role."""

from __future__ import annotations

import pytest
import torch
from tokenizer_layouts import LAYOUTS, build_tokenizer, tiny_llama

from direct_rlhf.config import LoraConfig
from direct_rlhf.data.chat_format import prompt_ids, special_wrapping
from direct_rlhf.models.loading import load_causal_lm
from direct_rlhf.models.reward_model import encode
from direct_rlhf.rollout.hf_generate import cut_response, sample
from direct_rlhf.train.ppo import assemble
from direct_rlhf.train.ppo_models import load_actor, load_reference
from direct_rlhf.train.sft import sft_example

PROMPTS = ["\n\nHuman: What is the capital of France?\n\nAssistant:", "\n\nHuman: Hi!\n\nAssistant:",
           "\n\nHuman: Tell me a joke.\n\nAssistant: Why?\n\nHuman: And Spain?\n\nAssistant:"]


@pytest.fixture(params=list(LAYOUTS))
def tok(request, tmp_path):
    return build_tokenizer(request.param, tmp_path / "tok")


def test_a_response_is_the_sampled_tokens_through_the_one_that_ended_the_turn(tok):
    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    answer, marker, pad, eos = enc(" Paris."), enc("\n\nHuman:"), [tok.pad_token_id] * 3, tok.eos_token_id
    # stopped on the marker, then padded (PAD is EOS in three of the four layouts): no EOS is kept
    assert cut_response(tok, answer + marker + pad) == (answer + marker, " Paris.", True)
    # the marker's last token completes it, even when tokens follow (a backend that returns them)
    assert cut_response(tok, answer + marker + enc(" And Spain?") + pad)[0] == answer + marker
    # a sampled EOS ends the turn
    assert cut_response(tok, answer + [eos] + pad) == (answer + [eos], " Paris.", True)
    # the length limit: not ended, nothing cut
    assert cut_response(tok, answer) == (answer, " Paris.", False)


def test_recorded_logprobs_equal_training_whatever_the_checkpoints_generation_config(tok, tmp_path):
    """A checkpoint's generation_config.json with a repetition penalty, n-gram blocking, top-k and
    banned words must not reach sampling: the log-probs recorded while sampling are the ones a
    forward pass over the assembled rows gives. Generation sees the tokenizer's BOS."""
    model = tiny_llama(tok)
    model.generation_config.update(do_sample=True, repetition_penalty=2.0, no_repeat_ngram_size=2, top_k=3,
                                   temperature=0.3,
                                   bad_words_ids=[[tok(" Paris", add_special_tokens=False)["input_ids"][0]]])
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = load_causal_lm(tmp_path / "m")
    assert model.generation_config.repetition_penalty == 2.0  # the file was read
    seen: list[torch.Tensor] = []
    generate = model.generate
    model.generate = lambda **kw: seen.append(kw["input_ids"]) or generate(**kw)
    samples = sample(model, tok, PROMPTS, 16, temperature=1.0, batch_size=3, seed=0, logprobs=True)
    seq, attn, pos, mask = assemble(tok, PROMPTS, samples.response_ids)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, -mask.shape[1] - 1:-1]
    recomputed = torch.log_softmax(logits.float(), -1).gather(-1, seq[:, -mask.shape[1]:, None]).squeeze(-1)
    for i, lp in enumerate(samples.logprobs):
        torch.testing.assert_close(lp, recomputed[i, :len(lp)], atol=1e-4, rtol=1e-4)
    head, _ = special_wrapping(tok)
    rows = [row[-len(ids):].tolist() for row, ids in zip(seen[0], prompt_ids(tok, PROMPTS))]
    assert rows == prompt_ids(tok, PROMPTS) and all(r[:len(head)] == head for r in rows)


def test_every_role_sees_the_same_bos_layout(tok):
    """Generation, the critic's and reference's rows, the reward model and SFT all start a text
    with the tokenizer's own leading special tokens (BOS for Llama and Mistral), in one way."""
    prompt, response = PROMPTS[0], " Paris."
    head, _ = special_wrapping(tok)
    adds_bos = tok("a")["input_ids"][0] == tok.bos_token_id
    assert head == ([tok.bos_token_id] if adds_bos else [])
    gen = prompt_ids(tok, [prompt])[0]
    assert gen[:len(head)] == head and len(gen) > len(head)
    body = tok(response, add_special_tokens=False)["input_ids"]
    seq, attn, _, _ = assemble(tok, [prompt], [body])
    reward_ids = encode(tok, [prompt], [response], 10_000)[0][0]
    sft_ids, _ = sft_example(tok, prompt, response, 10_000)
    for ids in (seq[0].tolist(), reward_ids, sft_ids):
        assert ids[:len(gen)] == gen
    # cut to a short window, the leading special tokens stay
    assert sft_example(tok, prompt, response, len(head) + len(body) + 3)[0][:len(head)] == head


def test_dropout_is_off_in_every_role(tok, tmp_path):
    tiny_llama(tok, attention_dropout=0.5).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    x = torch.tensor([prompt_ids(tok, PROMPTS[:1])[0]])
    for lora in (LoraConfig(enabled=True, r=4, alpha=8, dropout=0.5), LoraConfig(enabled=False)):
        actor = load_actor(str(tmp_path / "m"), "float32", lora)
        assert actor.training
        torch.testing.assert_close(actor(input_ids=x).logits, actor(input_ids=x).logits, atol=0, rtol=0)
    ref = load_reference(str(tmp_path / "m"), "float32", LoraConfig(enabled=False)).train()
    torch.testing.assert_close(ref(input_ids=x).logits, ref(input_ids=x).logits, atol=0, rtol=0)
