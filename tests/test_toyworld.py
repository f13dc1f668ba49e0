"""The toy world: deterministic, disjoint train/eval splits, and every record well-formed."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from conftest import SMALL_WORLD

from direct_rlhf.data import chat_format
from direct_rlhf.data.toyworld import dialogues as D
from direct_rlhf.data.toyworld.generate import write_world
from direct_rlhf.data.toyworld.knowledge import FAMILIES
from direct_rlhf.io import read_jsonl
from direct_rlhf.pipeline import ptx_texts


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.jsonl"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_world):
    write_world(SMALL_WORLD, tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(small_world)
    write_world(replace(SMALL_WORLD, seed=1), tmp_path / "other")
    assert _digest(tmp_path / "other")["corpus.jsonl"] != _digest(small_world)["corpus.jsonl"]


def _user_turns(transcripts) -> set[str]:
    return {m.content for t in transcripts for m in chat_format.parse(t) if m.role == "user"}


def test_train_and_eval_splits_are_disjoint(small_world):
    corpus = [r["text"] for r in read_jsonl(small_world / "corpus.jsonl")]
    dialogues = [t for t in corpus if t.startswith(chat_format.HUMAN)]
    drills = {line[len("Question: "):] for t in corpus for line in t.split("\n") if line.startswith("Question: ")}
    train_pairs = read_jsonl(small_world / "pairs_train.jsonl")
    train_turns = (_user_turns(dialogues) | drills | _user_turns(r["chosen"] for r in train_pairs)
                   | _user_turns(r["prompt"] for r in read_jsonl(small_world / "ppo_prompts.jsonl")))
    eval_turns = (_user_turns(r["prompt"] for r in read_jsonl(small_world / "eval/redteam.jsonl"))
                  | _user_turns(r["prompt"] for r in read_jsonl(small_world / "eval/conversation.jsonl"))
                  | _user_turns(r["chosen"] for r in read_jsonl(small_world / "pairs_eval.jsonl")))
    mc_questions = {r["question"] for f in FAMILIES for r in read_jsonl(small_world / f"eval/mc/{f.name}.jsonl")}
    assert train_turns and eval_turns and mc_questions
    assert not (train_turns & eval_turns)
    assert not (train_turns & mc_questions)
    assert not any(q in text for q in mc_questions for text in corpus)


def test_records_are_well_formed(small_world):
    assert len(FAMILIES) == 11
    for f in FAMILIES:
        rows = read_jsonl(small_world / f"eval/mc/{f.name}.jsonl")
        assert len(rows) == SMALL_WORLD.n_mc_per_task
        for r in rows:
            assert len(r["choices"]) == 4 == len(set(r["choices"]))
            assert r["choices"][r["answer"]] == dict(f.facts)[r["subject"]]
    pairs = read_jsonl(small_world / "pairs_train.jsonl")
    assert {r["subset"] for r in pairs} == {"helpful", "harmless"}
    openings_checked = 0
    for r in pairs:
        assert r["chosen"] != r["rejected"]
        p_c, good = chat_format.split_prompt_response(r["chosen"])
        p_r, bad = chat_format.split_prompt_response(r["rejected"])
        assert p_c == p_r  # same conversation, different final answer
        # a confident-fact rejected reply opens like its chosen reply: the pair differs in content only
        good, bad = good.lstrip(), bad.lstrip()
        opening = next((o for o in D.HELPFUL_PREFIXES if o and bad.startswith(o)), None)
        if opening and r["subset"] == "helpful" and good not in D.SMALL_TALK_REPLIES:
            assert good.startswith(opening), (good, bad)
            openings_checked += 1
    assert openings_checked > 10
    # a de-escalation given to a fact question is rejected (PPO found that hole); small talk keeps
    # it out, so that "polite" never looks bad next to a turn that could be a provocation
    deflections = set(D.POLITE_TO_HARM + D.POLITE_TO_PROVOCATION)
    deflected = [chat_format.parse(r["chosen"])[-2].content for r in pairs if r["subset"] == "helpful"
                 and chat_format.split_prompt_response(r["rejected"])[1].strip() in deflections]
    assert deflected and not set(deflected) & set(D.SMALL_TALK)
    convo = read_jsonl(small_world / "eval/conversation.jsonl")
    facts = [r for r in convo if r["kind"] == "fact"]
    assert facts and all(r["gold"] for r in facts)
    assert all(r["prompt"].endswith(chat_format.ASSISTANT) for r in convo)
    assert {r["kind"] for r in read_jsonl(small_world / "eval/redteam.jsonl")} == {"provoking", "harmful"}


def test_ptx_text_is_knowledge_not_dialogue(small_world):
    texts = ptx_texts(None, small_world)
    corpus = read_jsonl(small_world / "corpus.jsonl")
    assert texts and len(texts) == sum(r["source"] != "dialogue" for r in corpus)
    assert not any(chat_format.HUMAN in t for t in texts)
