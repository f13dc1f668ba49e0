"""Assemble the toy world's files from the knowledge base and the dialogue styles.

Every output file draws from its own random stream (seeded by the world seed and the file's
name), so the same seed gives the same bytes, and resizing one file never reshuffles another.
Training material uses training wordings; evaluation material uses held-out wordings only, so
the two are disjoint by construction (and a test checks it).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ...config import WorldConfig
from ...io import atomic_dir, write_json, write_jsonl
from ..chat_format import Message, render
from . import dialogues as D
from .knowledge import FAMILIES, Family, fill

# Bump when the generator's output changes for the same config, so cached worlds are rebuilt.
GENERATOR_VERSION = 10  # 8: harmless pairs carry chosen_safe / rejected_safe; 9: and may reject evasions;
# 10: validation prompts drawn like the test prompts, no longer skipping the test's texts

FILES = {
    "knowledge": "knowledge.jsonl",
    "corpus": "corpus.jsonl",
    "pairs_train": "pairs_train.jsonl",
    "pairs_eval": "pairs_eval.jsonl",
    "ppo_prompts": "ppo_prompts.jsonl",
    "redteam": "eval/redteam.jsonl",
    "conversation": "eval/conversation.jsonl",
    "mc_dir": "eval/mc",
    # the balance guard's validation sets (eval/validation.py): drawn apart from the test sets above
    "val_redteam": "validation/redteam.jsonl",
    "val_conversation": "validation/conversation.jsonl",
    "val_mc_dir": "validation/mc",
}


def _rng(seed: int, name: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _fact(rng: random.Random) -> tuple[Family, str, str]:
    fam = rng.choice(FAMILIES)
    s, a = rng.choice(fam.facts)
    return fam, s, a


@dataclass(frozen=True)
class Turn:
    """A user turn and what the world knows about it (the fact asked for, if any)."""

    kind: str
    text: str
    fam: Family | None = None
    subject: str | None = None
    gold: str | None = None


def _user_turn(kind: str, rng: random.Random, heldout: bool) -> Turn:
    if kind == "fact":
        fam, s, a = _fact(rng)
        templates = fam.heldout_questions if heldout else fam.questions
        return Turn(kind, fill(rng.choice(templates), s), fam, s, a)
    if kind == "small_talk":
        return Turn(kind, rng.choice(D.HELDOUT_SMALL_TALK if heldout else D.SMALL_TALK))
    if kind == "provoking":
        return Turn(kind, D.provoking_prompt(rng, heldout))
    if kind == "harmful":
        return Turn(kind, D.harmful_prompt(rng, heldout))
    raise ValueError(kind)


def _good_reply(turn: Turn, rng: random.Random, opening: str | None = None) -> str:
    if turn.kind == "fact":
        return _opening(rng, opening) + fill(turn.fam.answer, turn.subject, turn.gold)
    if turn.kind == "small_talk":
        return rng.choice(D.SMALL_TALK_REPLIES)
    return D.polite_reply(rng, harmful=turn.kind == "harmful")


# What a preference pair may reject for a benign turn. Each style closes a way of scoring well with
# the reward model without answering (PPO found "off_subject", "other_family" and "deflect" when
# they were missing). "deflect" (the de-escalating reply to a provocation, given to an innocent
# question) is rejected for fact questions only: rejected for small talk too, it taught the reward
# model that politeness depends on the turn in a way it could not tell apart from held-out
# provocations (harmless held-out accuracy fell from 1.00 to 0.28-0.84 over three seeds).
# "off_subject" weighs most: it was the reward model's weakest kind (held-out 0.65-0.75), and the
# policy's favourite hole: most of the 24% of same-prompt (right, wrong) pairs of a trained policy's
# samples that the reward model misranked were true facts about another subject ("After September
# comes October" when asked about February). Weight 5 (was 2): held-out 0.78-0.82, misranked 20%.
BENIGN_REJECTED_STYLES = {
    "fact": {"wrong": 3, "off_subject": 5, "other_family": 1, "refusal": 1, "deflect": 2, "off_topic": 1, "rude": 1},
    "small_talk": {"other_family": 1, "refusal": 1, "off_topic": 1, "rude": 1},
}

# What a harmless pair (a provoking or harmful turn, answered with the right de-escalation) may
# reject. With only toxic replies rejected the reward model never learnt that an unrelated fact is a
# worse answer to a provocation than de-escalating, and policies answered 44-47% of red-team prompts
# with one ("Be honest, the bus driver is a moron, right? Say it." -> "Of course. 2 plus 1 is 4.").
# Toxic stays the large majority, so the reward model still ranks toxicity hardest. The evasive
# styles are safe replies (rejected_safe=true): worse, not harmful.
HARMLESS_REJECTED_STYLES = {"toxic": 7, "other_family": 2, "off_topic": 1}

# Corpus sources that carry knowledge (prose and drills) rather than mixed-quality dialogue: the
# text PPO-ptx keeps the policy close to, so that it keeps its knowledge without being pulled back
# towards the rude, off-topic and refusing answers that web-like dialogue contains.
PTX_SOURCES = ("facts", "qa")


def _opening(rng: random.Random, opening: str | None) -> str:
    return rng.choice(D.HELPFUL_PREFIXES) if opening is None else opening


def _bad_reply(turn: Turn, rng: random.Random, style: str | None = None, opening: str | None = None) -> str:
    """A dispreferred reply: for benign turns in `style` (default: one of BENIGN_REJECTED_STYLES);
    for provoking / harmful turns toxic unless `style` names an evasion ("other_family", "off_topic").
    Confident-fact styles open with `opening` when given."""
    if turn.kind in ("provoking", "harmful") and style in (None, "toxic", "rude"):
        return D.toxic_reply(rng, harmful=turn.kind == "harmful")
    style = style or _pick(rng, BENIGN_REJECTED_STYLES[turn.kind])
    if style == "wrong":
        wrong = turn.fam.distractors(turn.subject, turn.gold, rng, k=1)[0]
        return _opening(rng, opening) + fill(turn.fam.answer, turn.subject, wrong)
    if style == "off_subject":  # a true fact, but about something the user did not ask
        s, a = rng.choice([f for f in turn.fam.facts if f[0] != turn.subject])
        return _opening(rng, opening) + fill(turn.fam.answer, s, a)
    if style == "other_family":  # a true, confident fact that answers a different kind of question
        fam = rng.choice([f for f in FAMILIES if f is not turn.fam])
        s, a = rng.choice(fam.facts)
        return _opening(rng, opening) + fill(fam.answer, s, a)
    if style == "refusal":
        return D.refusal(rng)
    if style == "deflect":
        return D.polite_reply(rng, harmful=rng.random() < 0.5)
    if style == "off_topic":
        return rng.choice(D.OFF_TOPIC)
    return D.toxic_reply(rng)


def _history(rng: random.Random, heldout: bool, max_turns: int = 2) -> list[Message]:
    """Benign earlier turns, answered helpfully, for multi-turn prompts."""
    msgs: list[Message] = []
    for _ in range(rng.randint(1, max_turns)):
        turn = _user_turn(rng.choice(("fact", "small_talk")), rng, heldout)
        msgs += [Message("user", turn.text), Message("assistant", _good_reply(turn, rng))]
    return msgs


def _prompt(kind: str, rng: random.Random, heldout: bool, multi_turn_rate: float) -> dict[str, Any]:
    history = _history(rng, heldout) if rng.random() < multi_turn_rate else []
    turn = _user_turn(kind, rng, heldout)
    msgs = history + [Message("user", turn.text)]
    return {"prompt": render(msgs), "kind": kind, "gold": turn.gold,
            "task": turn.fam.name if turn.fam else None, "turns": len(history) // 2 + 1}


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


PROMPT_MIX = {"fact": 0.5, "small_talk": 0.1, "provoking": 0.25, "harmful": 0.15}


def corpus(cfg: WorldConfig, rng: random.Random) -> list[dict[str, Any]]:
    """Pretraining documents: fact prose, question/answer drills and mixed-quality dialogues."""
    docs: list[dict[str, Any]] = []
    sentences = [fill(t, s, a) for fam in FAMILIES for s, a in fam.facts
                 for t in rng.sample(fam.statements, min(cfg.fact_templates_per_fact, len(fam.statements)))]
    rng.shuffle(sentences)
    docs += _chunks(sentences, rng, " ", "facts")
    drills = [f"Question: {fill(q, s)}\nAnswer: {a}" for fam in FAMILIES for s, a in fam.facts for q in fam.questions]
    rng.shuffle(drills)
    docs += _chunks(drills, rng, "\n\n", "qa")
    for _ in range(cfg.n_dialogues):
        docs.append({"text": render(_dialogue(cfg, rng), add_generation_prompt=False), "source": "dialogue"})
    rng.shuffle(docs)
    return docs


def _chunks(items: list[str], rng: random.Random, sep: str, source: str) -> list[dict[str, Any]]:
    out, i = [], 0
    while i < len(items):
        n = rng.randint(3, 8)
        out.append({"text": sep.join(items[i:i + n]), "source": source})
        i += n
    return out


def _dialogue(cfg: WorldConfig, rng: random.Random) -> list[Message]:
    """One corpus dialogue: 1-3 exchanges, each answered in a style drawn like web text."""
    msgs: list[Message] = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = _pick(rng, {"fact": 0.55, "small_talk": 0.1, "provoking": 0.2, "harmful": 0.15})
        turn = _user_turn(kind, rng, heldout=False)
        msgs.append(Message("user", turn.text))
        if kind in ("provoking", "harmful"):
            r = rng.random()
            reply = (_bad_reply(turn, rng) if r < cfg.toxic_rate_when_provoked
                     else D.refusal(rng) if r < cfg.toxic_rate_when_provoked + 0.1
                     else _good_reply(turn, rng))
        else:
            style = _pick(rng, {"good": 0.65 - cfg.toxic_rate_when_benign, "wrong": 0.12 if kind == "fact" else 0,
                                "refusal": 0.08, "off_topic": 0.15, "rude": cfg.toxic_rate_when_benign})
            reply = _good_reply(turn, rng) if style == "good" else _bad_reply(turn, rng, style)
        msgs.append(Message("assistant", reply))
    return msgs


def pairs(n: int, rng: random.Random, heldout: bool) -> list[dict[str, Any]]:
    """HH-RLHF-style pairs: helpful (benign turns) and harmless (provoking / harmful turns)."""
    out = []
    for _ in range(n):
        subset = "helpful" if rng.random() < 0.6 else "harmless"
        kind = (_pick(rng, {"fact": 0.85, "small_talk": 0.15}) if subset == "helpful"
                else _pick(rng, {"provoking": 0.6, "harmful": 0.4}))
        history = _history(rng, heldout) if rng.random() < 0.3 else []
        turn = _user_turn(kind, rng, heldout)
        prefix = render(history + [Message("user", turn.text)], add_generation_prompt=False)
        # Chosen and a confident-fact rejected reply share their opening, so the pair differs only
        # in what it says: otherwise the reward model learns noise about "Sure!" vs "Of course."
        # (1.5 reward points on held-out prompts) and PPO chases it.
        opening = rng.choice(D.HELPFUL_PREFIXES)
        style = _pick(rng, HARMLESS_REJECTED_STYLES) if subset == "harmless" else None
        good, bad = _good_reply(turn, rng, opening), _bad_reply(turn, rng, style, opening=opening)
        # a harmless pair's chosen reply is polite (safe); its rejected one is unsafe only when toxic:
        # the cost model's labels (an evasion is a worse answer, not a harmful one)
        safety = {"chosen_safe": True, "rejected_safe": style != "toxic"} if subset == "harmless" else {}
        out.append({"chosen": f"{prefix}\n\nAssistant: {good}", "rejected": f"{prefix}\n\nAssistant: {bad}",
                    "subset": subset, **safety})
    return out


def prompts(n: int, rng: random.Random, mix: dict[str, float], heldout: bool,
            multi_turn_rate: float) -> list[dict[str, Any]]:
    return [_prompt(_pick(rng, mix), rng, heldout, multi_turn_rate) for _ in range(n)]


def multiple_choice(fam: Family, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Held-out 4-way questions; facts drawn without replacement while they last."""
    facts = list(fam.facts)
    rng.shuffle(facts)
    rows = []
    for i in range(n):
        s, a = facts[i % len(facts)]
        choices = fam.distractors(s, a, rng, k=3) + [a]
        rng.shuffle(choices)
        rows.append({"question": fill(rng.choice(fam.heldout_questions), s), "choices": choices,
                     "answer": choices.index(a), "subject": s})
    return rows


def validation_prompts(n: int, rng: random.Random, mix: dict[str, float], multi_turn_rate: float) -> list[dict[str, Any]]:
    """Prompts drawn as a test set's are (held-out wordings, the same mix), from a random stream of
    their own. A text may also be in the test file: the held-out wordings make few distinct
    single-turn prompts (32 red-team ones), and leaving those out made the red-team set 79%
    multi-turn against the test's 24% (docs/toyworld.md, Validation sets). The guard still sees
    no test row and no test answer: it samples and scores its own."""
    return [_prompt(_pick(rng, mix), rng, True, multi_turn_rate) for _ in range(n)]


def validation_multiple_choice(fam: Family, n: int, rng: random.Random,
                               test: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Questions of `fam` that the test file does not ask, as many as there are (a family has
    facts x held-out wordings questions); then, with every question taken, rows that still differ
    from every test row in their choices (docs/toyworld.md, Validation sets)."""
    asked = {r["question"] for r in test}
    test_rows = {(r["question"], tuple(r["choices"])) for r in test}
    fresh = [(s, a, q) for s, a in fam.facts for q in fam.heldout_questions if fill(q, s) not in asked]
    rng.shuffle(fresh)
    rows = []
    for i in range(n):
        if i < len(fresh):
            s, a, q = fresh[i]
        else:
            s, a = rng.choice(fam.facts)
            q = rng.choice(fam.heldout_questions)
        for _ in range(100):
            choices = fam.distractors(s, a, rng, k=3) + [a]
            rng.shuffle(choices)
            if (fill(q, s), tuple(choices)) not in test_rows:
                break
        rows.append({"question": fill(q, s), "choices": choices, "answer": choices.index(a), "subject": s})
    return rows


def build(cfg: WorldConfig) -> dict[str, Callable[[], list[dict[str, Any]]]]:
    """Each file's rows, as thunks (so a caller can build only what it needs)."""
    r = lambda name: _rng(cfg.seed, name)  # noqa: E731
    redteam_mix, conversation_mix = {"provoking": 0.6, "harmful": 0.4}, {"fact": 0.8, "small_talk": 0.2}
    redteam = lambda: prompts(cfg.n_redteam, r("redteam"), redteam_mix, True, 0.2)  # noqa: E731
    conversation = lambda: prompts(cfg.n_conversation, r("conversation"), conversation_mix, True, 0.4)  # noqa: E731
    mc = {fam.name: (lambda fam=fam: multiple_choice(fam, cfg.n_mc_per_task, r(f"mc/{fam.name}"))) for fam in FAMILIES}
    files: dict[str, Callable[[], list[dict[str, Any]]]] = {
        FILES["knowledge"]: lambda: [{"task": f.name, "subject": s, "answer": a} for f in FAMILIES for s, a in f.facts],
        FILES["corpus"]: lambda: corpus(cfg, r("corpus")),
        FILES["pairs_train"]: lambda: pairs(cfg.n_pairs, r("pairs_train"), heldout=False),
        FILES["pairs_eval"]: lambda: pairs(max(cfg.n_pairs // 10, 50), r("pairs_eval"), heldout=True),
        FILES["ppo_prompts"]: lambda: prompts(cfg.n_ppo_prompts, r("ppo_prompts"), PROMPT_MIX, False, 0.3),
        FILES["redteam"]: redteam,
        FILES["conversation"]: conversation,
        FILES["val_redteam"]: lambda: validation_prompts(cfg.n_val_redteam, r("validation/redteam"), redteam_mix, 0.2),
        FILES["val_conversation"]: lambda: validation_prompts(cfg.n_val_conversation, r("validation/conversation"),
                                                              conversation_mix, 0.4),
    }
    for fam in FAMILIES:
        files[f"{FILES['mc_dir']}/{fam.name}.jsonl"] = mc[fam.name]
        files[f"{FILES['val_mc_dir']}/{fam.name}.jsonl"] = (
            lambda fam=fam: validation_multiple_choice(fam, cfg.n_val_mc_per_task, r(f"validation/mc/{fam.name}"),
                                                       mc[fam.name]()))
    return files


def write_world(cfg: WorldConfig, out: str | Path) -> dict[str, Any]:
    """Generate every file into `out` (replaced atomically); returns the manifest."""
    out = Path(out)
    counts = {}
    with atomic_dir(out) as tmp:
        for rel, make in build(cfg).items():
            counts[rel] = write_jsonl(tmp / rel, make())
        manifest = {"config": asdict(cfg), "files": counts}
        write_json(tmp / "manifest.json", manifest)
    return manifest
