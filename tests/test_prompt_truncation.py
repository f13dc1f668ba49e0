"""Prompts cut to fit the model (data/prompt_truncation.py): the rule on hand-made transcripts, and
through the CLI, a prompt file holding one huge transcript is cut and counted instead of growing
PPO's and the evaluation's memory without bound."""

from __future__ import annotations

import json
import time

import pytest
import tiny_eval_models as tiny
from conftest import MICRO

from direct_rlhf.cli import main
from direct_rlhf.data.chat_format import ASSISTANT, HUMAN
from direct_rlhf.data.prompt_truncation import prompt_budget, truncate_prompt, truncate_prompts
from direct_rlhf.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def transcript(*turns: str) -> str:
    """Human, Assistant, Human, ... then the open Assistant turn."""
    tags = [HUMAN if i % 2 == 0 else ASSISTANT for i in range(len(turns))]
    return "".join(f"{tag} {text}" for tag, text in zip(tags, turns)) + ASSISTANT


TURNS = ("what is the capital of France", "Paris", "what is one plus one", "two",
         "what colour is the sky", "blue", "thanks what is two plus three")


def test_a_prompt_that_fits_is_kept_byte_for_byte(tok):
    prompts = [transcript(*TURNS), "Human: hello" + ASSISTANT]
    assert truncate_prompts(prompts, tok, n_tokens(tok, prompts[0])) == (prompts, 0)


def test_the_oldest_turns_go_whole_and_the_longest_tail_from_a_human_turn_is_kept(tok):
    p = transcript(*TURNS)
    starts = [i for i in range(1, len(p)) if p.startswith(HUMAN, i)]  # the 2nd, 3rd and 4th Human turns
    assert len(starts) == 3
    for k, start in enumerate(starts):  # a budget that holds exactly the tail from each Human turn
        budget = n_tokens(tok, p[start:])
        assert truncate_prompt(p, tok, budget) == p[start:]
        assert truncate_prompt(p, tok, budget - 1) != p[start:]  # one token less: one more turn goes
    cut = truncate_prompt(p, tok, n_tokens(tok, p[starts[1]:]) + 3)  # between two turn boundaries
    assert cut == p[starts[1]:] and cut.startswith(HUMAN) and cut.endswith(ASSISTANT)


def test_a_last_human_turn_too_long_alone_keeps_its_last_tokens_between_the_tags(tok):
    question = " ".join(["what is the capital of France"] * 40) + " and of frog"
    for p in (transcript("hello", "hi", question), "Human: " + question + ASSISTANT):  # no leading blank line too
        cut = truncate_prompt(p, tok, 30)
        assert n_tokens(tok, cut) <= 30
        assert cut.startswith(HUMAN + " ") and cut.endswith(ASSISTANT)
        text = cut[len(HUMAN) + 1:-len(ASSISTANT)]
        assert len(text) > 40 and question.endswith(text)  # its end, as many tokens as fit


def test_the_budget_leaves_room_for_the_response_within_the_context(tok):
    assert prompt_budget(tok, 256, 48, None, "ppo") == 256
    assert prompt_budget(tok, 256, 48, 512, "ppo") == 256
    special = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])
    assert prompt_budget(tok, 256, 48, 200, "ppo") == 200 - 48 - special
    with pytest.raises(UserError, match=r"eval: a prompt may take only .* raise eval\.max_prompt_len"):
        prompt_budget(tok, 256, 190, 200, "eval")
    with pytest.raises(UserError, match=r"ppo: a prompt may take only 3 tokens \(ppo\.max_prompt_len\)"):
        prompt_budget(tok, 3, 48, 512, "ppo")


def test_a_transcript_of_thousands_of_turns_is_cut_in_linear_time(tok):
    p = transcript(*[TURNS[i % 6] for i in range(3001)])
    t0 = time.perf_counter()
    (cut,), n = truncate_prompts([p], tok, 64)
    assert n == 1 and n_tokens(tok, cut) <= 64 and cut.startswith(HUMAN) and cut.endswith(ASSISTANT)
    assert p.endswith(cut) and time.perf_counter() - t0 < 5


# ------------------------------------------------------------------------------------------------
# Through the CLI

PPO_TINY = ["ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=4",
            "ppo.steps=1", "ppo.save_every=1", "ppo.sample_every=1", "ppo.ptx_coef=0", "ppo.lora.enabled=false",
            "ppo.max_prompt_len=64", "threads=1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("trunc")
    return {"root": root, "base": tiny.save(tiny.causal_lm(tok), tok, root / "base"),
            "rm": tiny.reward_folder(tok, root / "rm")}


def _prompt_file(path, n_turns: int = 400):
    huge = transcript(*[TURNS[i % 6] for i in range(n_turns)], "what is one plus one")
    rows = [{"prompt": huge}, {"prompt": "what is the capital of France"}, {"prompt": "hello"}, {"prompt": "thanks"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ppo_cuts_a_huge_prompt_and_counts_it_in_run_info(models, tmp_path, tok):
    prompts = _prompt_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "run"
    assert main(["-q", "ppo", "--out", str(out), *MICRO, *PPO_TINY, f"ppo.prompts={prompts}",
                 f"model.base={models['base']}", f"ppo.reward_model={models['rm']}"]) == 0
    info = json.loads((out / "rlhf" / "run_info.json").read_text())
    assert info["prompts"] == {"n": 4, "cut": 1, "budget_tokens": 64}


def test_eval_cuts_a_huge_prompt_and_counts_it_in_results(models, tmp_path):
    prompts = _prompt_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "eval"
    assert main(["-q", "eval", "--models", f"base={models['base']}", "--out", str(out), f"out={tmp_path / 'run'}",
                 f"eval.redteam={prompts}", f"eval.conversation={prompts}", "eval.general=none",
                 "eval.max_prompt_len=64", "eval.samples_per_prompt=1", "eval.conversation_samples=1",
                 "eval.max_new_tokens=4", "eval.bootstrap=10", "eval.transcripts=1", "threads=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["harmlessness"]["n_prompts_cut"] == 1 and results["conversation"]["n_prompts_cut"] == 1
    assert any("longer than" in n for n in results["notes"])
