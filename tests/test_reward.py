"""Reward model: one loader for every format, the BT loss path, scoring at the last real token,
a folder plain transformers can load, and one-line errors for bad input."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import pytest
import torch
from conftest import MICRO
from transformers import AutoModelForSequenceClassification

from direct_rlhf.cli import main
from direct_rlhf.config import load_config
from direct_rlhf.data.chat_format import render
from direct_rlhf.data.preferences import Pair, load_pairs, pairs_from_rows
from direct_rlhf.errors import UserError
from direct_rlhf.io import read_jsonl, write_jsonl
from direct_rlhf.models.factory import tiny_mistral
from direct_rlhf.models.reward_model import (RewardScorer, build_reward_model, encode, pad_right, plain_model,
                                             rewards, score_ids)
from direct_rlhf.models.tokenizer import train_tokenizer
from direct_rlhf.tracking import seed_everything
from direct_rlhf.train.common import training_device
from direct_rlhf.train.pair_packing import can_pack, packed_len, packed_rewards
from direct_rlhf.train.reward import (PreferenceData, accuracy_table, cost_pairs, encode_pairs, pair_loss, pairwise_accuracy,
                                      train_preference_model)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, small_world):
    """A random-init micro Mistral with the toy tokenizer, saved as a plain HF folder (no pretraining)."""
    cfg = load_config(None, MICRO)
    texts = [r["text"] for r in read_jsonl(small_world / "corpus.jsonl")]
    tok = train_tokenizer(texts, cfg.model.vocab_size)
    out = tmp_path_factory.mktemp("tiny") / "base"
    tiny_mistral(cfg.model, tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(*extra: str):
    return load_config(None, [*MICRO, *extra])


# ------------------------------------------------------------------------------------------------
# Formats: every accepted shape of the same conversations gives the same pairs

CONVERSATIONS = [  # (history, user turn, chosen, rejected, subset)
    ([], "How do I hurt my sister?", "I can't help with hurting anyone.", "Just punch her.", "harmless"),
    ([("What is 2 plus 3?", "2 plus 3 is 5.")], "What colour is a lemon?", "A lemon is usually yellow.",
     "I like turtles.", "helpful"),
]


def _messages(history, user):
    msgs = []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": user}]


def _rows(fmt: str) -> list[dict]:
    rows = []
    for history, user, good, bad, subset in CONVERSATIONS:
        msgs = _messages(history, user)
        if fmt == "hh":
            row = {"chosen": render(msgs + [{"role": "assistant", "content": good}], False),
                   "rejected": render(msgs + [{"role": "assistant", "content": bad}], False)}
        elif fmt == "trl_prompt":
            row = {"prompt": msgs, "chosen": [{"role": "assistant", "content": good}],
                   "rejected": [{"role": "assistant", "content": bad}]}
        elif fmt == "trl_conversation":
            row = {"chosen": msgs + [{"role": "assistant", "content": good}],
                   "rejected": msgs + [{"role": "assistant", "content": bad}]}
        else:  # TRL standard: prompt and responses as strings
            row = {"prompt": render(msgs), "chosen": " " + good, "rejected": " " + bad}
        rows.append({**row, "subset": subset})
    return rows


EXPECTED = [
    Pair("\n\nHuman: How do I hurt my sister?\n\nAssistant:", " I can't help with hurting anyone.",
         " Just punch her.", "harmless"),
    Pair("\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.\n\nHuman: What colour is a lemon?"
         "\n\nAssistant:", " A lemon is usually yellow.", " I like turtles.", "helpful"),
]


@pytest.mark.parametrize("fmt", ["hh", "trl_prompt", "trl_conversation", "trl_standard"])
def test_each_jsonl_format_loads_to_the_same_pairs(tmp_path, fmt):
    write_jsonl(tmp_path / "p.jsonl", _rows(fmt))
    pairs, stats = load_pairs(tmp_path / "p.jsonl")
    assert pairs == EXPECTED and stats.kept == 2


def test_one_file_may_mix_the_formats_line_by_line(tmp_path):
    """The README says so: each line is read in its own format."""
    write_jsonl(tmp_path / "p.jsonl", [_rows("hh")[0], _rows("trl_standard")[1]])
    assert load_pairs(tmp_path / "p.jsonl")[0] == EXPECTED
    write_jsonl(tmp_path / "p.jsonl", [_rows("trl_conversation")[0], _rows("trl_prompt")[1]])
    assert load_pairs(tmp_path / "p.jsonl")[0] == EXPECTED


def test_trl_standard_format_with_plain_string_prompts_loads_to_the_same_pairs(tmp_path):
    """TRL's standard format as most datasets write it: a plain-text prompt (one Human turn) and bare
    responses; a prompt that already is an HH transcript ("Human:" with or without the leading blank
    line) is taken as it is."""
    rows = [{"prompt": "How do I hurt my sister?", "chosen": "I can't help with hurting anyone.",
             "rejected": " Just punch her.", "subset": "harmless"},
            {"prompt": render(_messages(*CONVERSATIONS[1][:2])).lstrip("\n"), "chosen": "A lemon is usually yellow.",
             "rejected": " I like turtles.", "subset": "helpful"}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_pairs(tmp_path / "p.jsonl")[0] == EXPECTED
    with pytest.raises(UserError, match=r"mem:1: field 'chosen' does not end with an Assistant turn"):
        pairs_from_rows([{"prompt": "Hi", "chosen": "Hello\n\nHuman: and?", "rejected": "Go"}], "mem")


def test_hf_datasets_saved_to_disk_and_local_json_folder_load_to_the_same_pairs(tmp_path):
    import datasets

    datasets.Dataset.from_list(_rows("trl_prompt")).save_to_disk(str(tmp_path / "saved"))
    assert load_pairs(tmp_path / "saved")[0] == EXPECTED
    datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("hh"))}).save_to_disk(str(tmp_path / "dd"))
    assert load_pairs(tmp_path / "dd", split="test")[0] == EXPECTED
    (tmp_path / "local").mkdir()
    write_jsonl(tmp_path / "local" / "train.jsonl", _rows("hh"))
    assert load_pairs(tmp_path / "local", split="train")[0] == EXPECTED


def test_local_file_without_eval_file_holds_out_a_seeded_fraction(tmp_path):
    from direct_rlhf.train.reward import preference_data

    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
            for i in range(40)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    data = preference_data(_cfg(f"reward.data={tmp_path / 'p.jsonl'}", "reward.eval_fraction=0.1"), world=None)
    assert len(data.train) == 36 and len(data.eval) == 4 and not set(data.train) & set(data.eval)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))  # a single Dataset: no splits either
    assert len(preference_data(_cfg(f"reward.data={tmp_path / 'one'}"), world=None).eval) == 2


def test_toy_world_pairs_round_trip_byte_exact_and_subset_filter(small_world):
    rows = read_jsonl(small_world / "pairs_train.jsonl")
    pairs, stats = load_pairs(small_world / "pairs_train.jsonl")
    assert [p.prompt + p.chosen for p in pairs] == [r["chosen"] for r in rows]
    assert stats.by_subset["harmless"] + stats.by_subset["helpful"] == len(rows)
    harmless, _ = load_pairs(small_world / "pairs_train.jsonl", subset="harmless")
    assert len(harmless) == stats.by_subset["harmless"] and {p.subset for p in harmless} == {"harmless"}


def test_toy_world_harmless_pairs_carry_safety_labels(small_world):
    """A harmless toy pair's chosen reply is polite (safe); its rejected one is toxic (unsafe) or,
    less often, an evasion (an unrelated fact or remark: worse, but safe). The labels the cost
    model's classification term needs. Helpful pairs carry none."""
    import re

    from direct_rlhf.data.toyworld.dialogues import TOXIC, TOXIC_HARM
    from direct_rlhf.eval.appropriateness import toy_label

    pairs, _ = load_pairs(small_world / "pairs_train.jsonl")
    labels = [(p.subset, p.chosen_safe, p.rejected_safe) for p in pairs]
    assert set(labels) == {("harmless", True, False), ("harmless", True, True), ("helpful", None, None)}
    assert labels.count(("harmless", True, False)) > 2 * labels.count(("harmless", True, True))  # toxic the majority
    toxic = re.compile("|".join(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) for t in TOXIC + TOXIC_HARM))
    for p in pairs:
        if p.subset == "harmless":
            bad = p.rejected.strip()
            assert p.rejected_safe == (toy_label("provoking", bad) == "off_topic"), bad
            assert p.rejected_safe != bool(toxic.fullmatch(bad)), bad


def test_system_message_is_folded_into_first_user_turn_and_margin_kept():
    row = {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
           "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}], "margin": 2}
    (pair,), _ = pairs_from_rows([row], "mem")
    assert pair.prompt == "\n\nHuman: Be kind.\n\nHi\n\nAssistant:" and pair.margin == 2.0


def test_identical_pairs_are_dropped_and_counted():
    rows = _rows("hh") + [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}]
    pairs, stats = pairs_from_rows(rows, "mem")
    assert len(pairs) == 2 and stats.dropped_identical == 1


# ------------------------------------------------------------------------------------------------
# Bad input: one UserError naming file, line and problem

GOOD = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: a\n\nAssistant: no"})
BAD_INPUTS = {
    "malformed_json": (GOOD + "\n{oops\n", r"p\.jsonl:2: not valid JSON"),
    "missing_chosen": (GOOD + "\n" + json.dumps({"rejected": "\n\nHuman: a\n\nAssistant: no"}),
                       r"p\.jsonl:2: missing field 'chosen'"),
    "missing_rejected": (json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: no"}), r"p\.jsonl:1: missing field 'rejected'"),
    "no_assistant_turn": (json.dumps({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}),
                          r"p\.jsonl:1: field 'chosen' has no Assistant turn"),
    "different_prompts": (json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}),
                          r"p\.jsonl:1: 'chosen' and 'rejected' have different prompts"),
    "empty_file": ("\n", r"p\.jsonl: no preference pairs"),
    "all_identical": (json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: x"}),
                      r"p\.jsonl: no preference pairs \(1 dropped with chosen == rejected\)"),
    "safety_label_not_a_bool": (GOOD[:-1] + ', "chosen_safe": true, "rejected_safe": "no"}',
                                r"p\.jsonl:1: field 'rejected_safe' must be true or false"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_user_error_with_file_and_line(tmp_path, name):
    text, pattern = BAD_INPUTS[name]
    (tmp_path / "p.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=pattern):
        load_pairs(tmp_path / "p.jsonl")


def test_non_utf8_and_empty_subset_and_unknown_hf_dataset(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(GOOD.encode() + b"\n" + b'{"chosen": "\xff"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: not UTF-8"):
        load_pairs(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text(json.dumps({**json.loads(GOOD), "subset": "helpful"}) + "\n")
    with pytest.raises(UserError, match=r"q\.jsonl: no preference pairs after keeping subset=harmless"):
        load_pairs(tmp_path / "q.jsonl", subset="harmless")
    with pytest.raises(UserError, match=r"no-such-org/no-such-set\[train\]: cannot load dataset"):
        load_pairs("no-such-org/no-such-set")


BROKEN = [json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: more?",  # ends in a Human turn
                      "rejected": "\n\nHuman: a\n\nAssistant: y"}),
          json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"})]


def test_skip_invalid_drops_and_counts_broken_records_and_the_error_says_how(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([GOOD, BROKEN[0], GOOD.replace("yes", "sure"), BROKEN[1]]) + "\n")
    with pytest.raises(UserError, match=r"p\.jsonl:2: field 'chosen' does not end with an Assistant turn "
                                        r"\(reward\.skip_invalid=true"):
        load_pairs(path)
    logging.getLogger("direct_rlhf").addHandler(caplog.handler)
    try:
        pairs, stats = load_pairs(path, skip_invalid=True)
    finally:
        logging.getLogger("direct_rlhf").removeHandler(caplog.handler)
    assert [p.chosen for p in pairs] == [" yes", " sure"]
    assert (stats.rows, stats.kept, stats.skipped_invalid) == (4, 2, 2)
    assert stats.first_invalid.startswith(f"{path}:2: field 'chosen' does not end")
    assert f"{path}: skipped 2 of 4 records as invalid" in caplog.text
    (tmp_path / "q.jsonl").write_text(BROKEN[1] + "\n")  # nothing left: still an error, saying why
    with pytest.raises(UserError, match=r"q\.jsonl: no preference pairs \(1 skipped as invalid, the first: .*"
                                        r"q\.jsonl:1: 'chosen' and 'rejected' have different prompts"):
        load_pairs(tmp_path / "q.jsonl", skip_invalid=True)
    (tmp_path / "r.jsonl").write_text(GOOD + "\n{oops\n")  # a broken file is not a broken record
    with pytest.raises(UserError, match=r"r\.jsonl:2: not valid JSON"):
        load_pairs(tmp_path / "r.jsonl", skip_invalid=True)


def test_cli_reward_with_skip_invalid_trains_and_records_what_it_skipped(tmp_path, tiny_base):
    rows = [json.dumps(r) for r in _rows("hh")] * 8 + BROKEN
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    args = ["-q", "reward", "--out", str(run), *MICRO, f"model.base={tiny_base}", f"reward.data={tmp_path / 'p.jsonl'}",
            "reward.epochs=1", "reward.batch_size=4"]
    assert main(args) == 2 and not run.exists()
    assert main([*args, "reward.skip_invalid=true"]) == 0
    load = json.loads((run / "reward" / "run_info.json").read_text())["data"]["train_load"]
    assert (load["rows"], load["skipped_invalid"]) == (18, 2) and "p.jsonl:17: " in load["first_invalid"]
    # the cache follows the data file's contents: unchanged, reused; edited in place, trained again
    stamp = (run / "reward" / "stage.json").read_text()
    assert main([*args, "reward.skip_invalid=true"]) == 0 and (run / "reward" / "stage.json").read_text() == stamp
    (tmp_path / "p.jsonl").write_text("\n".join(rows[2:]) + "\n")
    assert main([*args, "reward.skip_invalid=true"]) == 0 and (run / "reward" / "stage.json").read_text() != stamp
    assert json.loads((run / "reward" / "run_info.json").read_text())["data"]["train_load"]["rows"] == 16


@pytest.mark.parametrize("name", ["malformed_json", "no_assistant_turn", "empty_file"])
def test_cli_bad_data_exit_2_one_line_nothing_written(tmp_path, capsys, tiny_base, name):
    (tmp_path / "p.jsonl").write_text(BAD_INPUTS[name][0], encoding="utf-8")
    run = tmp_path / "run"
    code = main(["-q", "reward", "--out", str(run), *MICRO, f"model.base={tiny_base}",
                 f"reward.data={tmp_path / 'p.jsonl'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("direct-rlhf: error: ") and "p.jsonl" in err[0]
    assert not run.exists()


# ------------------------------------------------------------------------------------------------
# The model: loss path, padding, truncation, training, saving


@pytest.mark.parametrize("packed", [False, True])
def test_bt_loss_through_the_trainer_path_equals_hand_computation(tiny_base, packed):
    model, tok = build_reward_model(str(tiny_base), _cfg())
    assert can_pack(model, 256)
    model.config.sliding_window = 128  # the packed mask does not apply a window: only where it covers a transcript
    assert can_pack(model, 128) and not can_pack(model, 256)
    model.config.sliding_window = None
    pairs = [replace(EXPECTED[0], margin=0.5), replace(EXPECTED[1], margin=1.5)]
    batch, _ = encode_pairs(tok, pairs, max_len=256)
    loss, stats = pair_loss(model, batch, tok.pad_token_id, torch.tensor([0.5, 1.5]), center_coef=0.1, packed=packed)
    with torch.no_grad():  # each sequence alone: no padding anywhere
        one = [[model(input_ids=torch.tensor([s])).logits.item() for s in pair] for pair in batch]
    terms = [-math.log(1 / (1 + math.exp(-(c - r - m)))) for (c, r), m in zip(one, (0.5, 1.5))]
    center = sum((c + r) ** 2 for c, r in one) / 2
    assert loss.item() == pytest.approx(sum(terms) / 2 + 0.1 * center, abs=1e-5)
    assert stats["margin"].item() == pytest.approx(sum(c - r for c, r in one) / 2, abs=1e-5)


def test_packed_pairs_score_like_separate_sequences(tiny_base):
    """Shared prefixes of every shape: none, rejected inside chosen, chosen inside rejected, a long one."""
    model, tok = build_reward_model(str(tiny_base), _cfg())
    model.eval()
    batch = [([5, 6, 7, 8], [9, 10]), ([5, 6, 7, 8, 9], [5, 6, 7]), ([5, 6], [5, 6, 7, 8, 9, 10]),
             ([11, 12, 13, 14, 15, 16], [11, 12, 13, 14, 15, 17, 18])]
    assert [packed_len(p) for p in batch] == [6, 5, 6, 8]
    with torch.no_grad():
        chosen, rejected = packed_rewards(model, batch, tok.pad_token_id)
        alone = [[model(input_ids=torch.tensor([s])).logits.item() for s in pair] for pair in batch]
    assert torch.allclose(torch.stack([chosen, rejected], 1), torch.tensor(alone), atol=1e-5)


def test_score_is_read_at_last_real_token_whatever_the_padding(tiny_base):
    model, tok = build_reward_model(str(tiny_base), _cfg())
    model.eval()
    (short, long_), _ = encode(tok, ["\n\nHuman: hi\n\nAssistant:"] * 2, [" yes", " yes " * 10], 256)
    pad = tok.pad_token_id
    with torch.no_grad():
        alone = rewards(model, torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
        right_ids, right_mask = pad_right([short, long_], pad)  # short is right-padded
        right = rewards(model, right_ids, right_mask)
        n = len(long_) - len(short)
        left_ids = torch.tensor([[pad] * n + short])
        left_mask = torch.tensor([[0] * n + [1] * len(short)])
        left = rewards(model, left_ids, left_mask)
    assert right[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert left.item() == pytest.approx(alone.item(), abs=1e-5)
    assert abs(right[1].item() - alone.item()) > 1e-6  # a different text scores differently


def test_truncation_keeps_the_end(tiny_base):
    _, tok = build_reward_model(str(tiny_base), _cfg())
    prompt, response = "\n\nHuman: " + "tell me more " * 30 + "\n\nAssistant:", " The end."
    (ids,), n = encode(tok, [prompt], [response], max_len=12)
    assert n == 1 and len(ids) == 12 and tok.decode(ids).endswith("Assistant: The end.")
    assert encode(tok, [prompt], [response], max_len=10_000)[1] == 0
    # a tokenizer that adds a BOS (as Llama/Mistral ones do) keeps it first after truncation
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = tok.backend_tokenizer
    backend.post_processor = TemplateProcessing(single=f"{tok.eos_token} $A",
                                                special_tokens=[(tok.eos_token, tok.eos_token_id)])
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, pad_token=tok.pad_token)
    (ids,), n = encode(bos_tok, [prompt], [response], max_len=12)
    assert n == 1 and len(ids) == 12 and ids[0] == tok.eos_token_id and bos_tok.decode(ids[1:]).endswith("The end.")


def test_separable_pairs_reach_accuracy_one(tmp_path, tiny_base):
    """Rejected always holds 'thanks', chosen never does (a random model prefers it: see `before`)."""
    words = ["apple", "river", "stone", "cloud", "green", "table", "seven", "happy", "north", "music"]
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(48):
        a, b, c = (words[j] for j in torch.randint(len(words), (3,), generator=gen).tolist())
        pairs.append(Pair(f"\n\nHuman: say {a} {b}?\n\nAssistant:", f" {a} {c} {b}.", f" {a} thanks {b}.", "helpful"))
    cfg = _cfg("reward.epochs=4", "reward.batch_size=8", "reward.lr=3e-3", "reward.warmup_steps=2",
               "reward.eval_every=1000", "reward.stats_pairs=16")
    seed_everything(cfg.seed)  # the trainer's own seeding: the same initial model it will start from
    model, tok = build_reward_model(str(tiny_base), cfg)
    before, _ = pairwise_accuracy(model, encode_pairs(tok, pairs, 256)[0], pairs, tok.pad_token_id, 16)
    assert before["all"] < 0.9
    data = PreferenceData(pairs[:40], pairs[40:], {"train_load": {"dropped_identical": 0}}, key=None)
    out = train_preference_model(cfg, str(tiny_base), data, tmp_path / "rm", tmp_path / "logs", "k", progress=False)
    result = json.loads((out / "eval.json").read_text())
    assert result["heldout"]["all"] == 1.0 and result["train"]["all"] == 1.0
    metrics = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin", "lr"} <= set(metrics[1]) and "eval/accuracy/helpful" in metrics[-2]


def test_lora_is_merged_into_a_plain_model_with_the_same_scores(tiny_base):
    model, tok = build_reward_model(str(tiny_base), _cfg("reward.lora.enabled=true", "reward.lora.r=2"))
    assert any("lora_" in n for n, _ in model.named_parameters())
    batch, _ = encode_pairs(tok, EXPECTED, 256)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    pair_loss(model, batch, tok.pad_token_id, packed=True)[0].backward()
    opt.step()  # adapters (initialised as a no-op) and the score head now differ from the base
    seqs = [s for pair in batch for s in pair]
    model.eval()
    before = score_ids(model, seqs, tok.pad_token_id, batch_size=4)
    merged = plain_model(model)
    assert type(merged).__name__ == "MistralForSequenceClassification"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(score_ids(merged, seqs, tok.pad_token_id, batch_size=4), before, atol=1e-5)


def test_cost_pairs_are_harmless_with_roles_swapped():
    (pair,) = cost_pairs(EXPECTED)
    assert pair.subset == "harmless" and pair.chosen == EXPECTED[0].rejected and pair.rejected == EXPECTED[0].chosen


def test_cost_pairs_swap_the_safety_labels_with_the_responses():
    pair = replace(EXPECTED[0], chosen_safe=True, rejected_safe=False)
    (cost,) = cost_pairs([pair])
    assert (cost.chosen, cost.chosen_safe, cost.rejected, cost.rejected_safe) == \
        (pair.rejected, False, pair.chosen, True)


@pytest.mark.parametrize("packed", [False, True])
def test_cost_loss_is_bt_plus_safe_rlhfs_sign_term_on_each_side_by_hand(tiny_base, packed):
    """Safe-RLHF's sequence-wise cost loss, per pair: -logsig(c_unsafer - c_safer) - logsig(s c_unsafer)
    - logsig(s c_safer), s = +1 for an unsafe response and -1 for a safe one; mean over pairs."""
    from direct_rlhf.train.reward import safety_targets

    model, tok = build_reward_model(str(tiny_base), _cfg())
    pairs = cost_pairs([replace(EXPECTED[0], chosen_safe=True, rejected_safe=False),  # unsafer unsafe, safer safe
                        replace(EXPECTED[1], subset="harmless", chosen_safe=False, rejected_safe=False)])  # both unsafe
    assert safety_targets(pairs).tolist() == [[1.0, 0.0], [1.0, 1.0]]
    batch, _ = encode_pairs(tok, pairs, max_len=256)
    loss, stats = pair_loss(model, batch, tok.pad_token_id, packed=packed, unsafe=safety_targets(pairs))
    with torch.no_grad():  # each sequence alone
        one = [[model(input_ids=torch.tensor([s])).logits.item() for s in pair] for pair in batch]

    def nls(x):  # -log sigmoid(x)
        return math.log1p(math.exp(-x))

    signs = [(1, -1), (1, 1)]
    terms = [nls(c - r) + nls(sc * c) + nls(sr * r) for (c, r), (sc, sr) in zip(one, signs)]
    assert loss.item() == pytest.approx(sum(terms) / 2, abs=1e-5)
    right = [sc * c > 0 for (c, _), (sc, _) in zip(one, signs)] + [sr * r > 0 for (_, r), (_, sr) in zip(one, signs)]
    assert stats["sign_accuracy"].item() == pytest.approx(sum(right) / 4)
    plain, _ = pair_loss(model, batch, tok.pad_token_id, packed=packed)  # the reward model's loss: BT alone
    assert plain.item() == pytest.approx(sum(nls(c - r) for c, r in one) / 2, abs=1e-5)


def test_a_cost_model_trained_with_safety_labels_puts_unsafe_above_zero_and_safe_below(tmp_path, tiny_base):
    """The classification term in training: every held-out response lands on its label's side of 0
    (Bradley-Terry alone fixes only differences, so the sign would be anyone's guess)."""
    words = ["apple", "river", "stone", "cloud", "green", "table", "seven", "happy", "north", "music"]
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(48):  # the rejected reply (with 'thanks') is the unsafe one
        a, b, c = (words[j] for j in torch.randint(len(words), (3,), generator=gen).tolist())
        pairs.append(Pair(f"\n\nHuman: say {a} {b}?\n\nAssistant:", f" {a} {c} {b}.", f" {a} thanks {b}.",
                          "harmless", chosen_safe=True, rejected_safe=False))
    pairs = cost_pairs(pairs)
    cfg = _cfg("reward.epochs=4", "reward.batch_size=8", "reward.lr=3e-3", "reward.warmup_steps=2",
               "reward.eval_every=1000", "reward.stats_pairs=16")
    data = PreferenceData(pairs[:40], pairs[40:], {"train_load": {"dropped_identical": 0}}, key=None)
    out = train_preference_model(cfg, str(tiny_base), data, tmp_path / "cost", tmp_path / "logs", "k",
                                 progress=False, stage="cost")
    result = json.loads((out / "eval.json").read_text())
    assert result["heldout"]["all"] == 1.0 and result["sign_accuracy"] == {"heldout": 1.0, "train": 1.0}
    scorer = RewardScorer(out)
    held = pairs[40:]
    unsafe = scorer.score([p.prompt for p in held], [p.chosen for p in held])
    safe = scorer.score([p.prompt for p in held], [p.rejected for p in held])
    assert (unsafe > 0).all() and (safe < 0).all()
    assert "above 0 = unsafe" in json.loads((out / "reward_stats.json").read_text())["zero"]
    metrics = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert "sign_accuracy" in metrics[1] and any("eval/sign_accuracy" in m for m in metrics)


def test_cost_model_on_pairs_without_safety_labels_is_a_one_line_error(tmp_path, capsys, tiny_base):
    """HH-style data says which answer is worse, not which is unsafe: the cost model refuses it."""
    rows = [json.dumps(r) for r in _rows("hh")] * 8
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    args = ["-q", "reward", "--out", str(run), "--cost", *MICRO, f"model.base={tiny_base}",
            f"reward.data={tmp_path / 'p.jsonl'}", "reward.epochs=1", "reward.batch_size=4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl" in err[0] and "'chosen_safe' and 'rejected_safe'" in err[0], err
    assert not (run / "cost").exists()
    # labelled the wrong way round (the more harmless answer unsafe, the other safe): refused too
    labelled = [{**r, "chosen_safe": False, "rejected_safe": True} for r in _rows("hh")] * 8
    write_jsonl(tmp_path / "p.jsonl", labelled)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labelled unsafe" in err[0] and not (run / "cost").exists()


def test_cli_reward_and_cost_save_plain_hf_folders_scored_alike(tmp_path, capsys, tiny_base, small_world):
    run = tmp_path / "run"
    # tiny_base is not a toy base direct-rlhf pretrained, so the toy pairs must be named, not defaulted to
    args = ["-q", "reward", "--out", str(run), "--cost", *MICRO, f"model.base={tiny_base}", "reward.epochs=1",
            "reward.batch_size=16", "reward.stats_pairs=0", "reward.eval_every=5",
            f"reward.data={small_world / 'pairs_train.jsonl'}", f"reward.eval_data={small_world / 'pairs_eval.jsonl'}"]
    assert main(args) == 0
    rm = run / "reward"
    for name in ("model.safetensors", "tokenizer.json", "reward_stats.json", "eval.json", "stage.json"):
        assert (rm / name).is_file(), name
    stats = json.loads((rm / "reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["max_len"] == 256
    assert json.loads((run / "cost" / "reward_stats.json").read_text())["higher_is"] == "more harmful"
    # plain transformers gives the same scores as RewardScorer
    pairs, _ = load_pairs(small_world / "pairs_eval.jsonl")
    prompts, responses = [p.prompt for p in pairs[:8]], [p.chosen for p in pairs[:8]]
    scorer = RewardScorer(rm, batch_size=3)
    ours = scorer.score(prompts, responses)
    plain = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    with torch.no_grad():
        for prompt, response, score in zip(prompts, responses, ours):
            ids = scorer.tokenizer(prompt + response, return_tensors="pt")
            assert plain(**ids).logits.item() == pytest.approx(score.item(), abs=1e-5)
    assert ours.dtype == torch.float32
    # the normalisation PPO uses: mean and std of the saved model's scores of every training response
    train, _ = load_pairs(small_world / "pairs_train.jsonl")
    every = scorer.score([p.prompt for p in train] * 2, [p.chosen for p in train] + [p.rejected for p in train])
    assert stats["n"] == len(every)
    # (trained on a GPU, the stats come from its attention kernels: 2.9e-4 off the CPU's mean on an H200)
    close = 1e-4 if training_device().type == "cpu" else 1e-3
    assert (stats["mean"], stats["std"]) == pytest.approx((every.mean().item(), every.std().item()), abs=close)
    torch.testing.assert_close(scorer.normalise(ours), (ours - stats["mean"]) / stats["std"])
    # held-out accuracy as recorded during training equals what --eval-only reports
    capsys.readouterr()
    assert main(["-q", "reward", "--eval-only", "--model", str(rm), "--data", str(small_world / "pairs_eval.jsonl")]) == 0
    table = capsys.readouterr().out.splitlines()
    recorded = json.loads((rm / "eval.json").read_text())["heldout"]
    assert table[0].split() == ["subset", "pairs", "accuracy"]
    assert table[1].split() == ["all", str(recorded["n"]), f"{recorded['all']:.3f}"]
    assert {line.split()[0] for line in table[2:]} == {"harmless", "helpful"}
    # unchanged config: cached, not retrained
    mtime = (rm / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0 and (rm / "model.safetensors").stat().st_mtime_ns == mtime


def test_pairwise_accuracy_reports_per_subset(tiny_base):
    model, tok = build_reward_model(str(tiny_base), _cfg())
    enc, _ = encode_pairs(tok, EXPECTED, 256)
    table, scores = pairwise_accuracy(model, enc, EXPECTED, tok.pad_token_id, batch_size=1)
    assert scores.shape == (4,) and table["n"] == 2 and table["n/harmless"] == 1 and table["n/helpful"] == 1
    won = [float(scores[i] > scores[2 + i]) for i in range(2)]  # chosen scores first, then rejected
    assert (table[EXPECTED[0].subset], table[EXPECTED[1].subset], table["all"]) == (won[0], won[1], sum(won) / 2)
    # ties count as wrong, and each subset is averaged over its own pairs only
    table = accuracy_table(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]), ["a", "a", "b", "b", None])
    assert table == pytest.approx({"all": 0.6, "n": 5, "a": 0.5, "n/a": 2, "b": 0.5, "n/b": 2})
    assert pairwise_accuracy(_Constant(), enc, EXPECTED, tok.pad_token_id, batch_size=1)[0]["all"] == 0.0


class _Constant(torch.nn.Module):
    """A reward model that scores everything alike: every pair is a tie."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(len(input_ids), 1) + self.w)


def test_a_run_killed_after_an_epoch_resumes_to_the_same_model(tmp_path, tiny_base, small_world, monkeypatch):
    import direct_rlhf.train.reward as reward_mod
    from safetensors.torch import load_file

    pairs, _ = load_pairs(small_world / "pairs_train.jsonl")
    data = PreferenceData(pairs[:48], pairs[48:64], {"train_load": {}}, key=None)
    cfg = _cfg("reward.epochs=2", "reward.batch_size=16", "reward.eval_every=1000", "reward.stats_pairs=16",
               "reward.log_every=1")
    full = train_preference_model(cfg, str(tiny_base), data, tmp_path / "full", tmp_path / "lf", "k", progress=False)

    calls, real = {"n": 0}, reward_mod.pair_loss

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # 3 batches per epoch: killed in the middle of the second epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reward_mod, "pair_loss", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_preference_model(cfg, str(tiny_base), data, tmp_path / "part", tmp_path / "lp", "k", progress=False)
    assert not (tmp_path / "part").exists() and (tmp_path / "lp" / "checkpoints").is_dir()
    monkeypatch.setattr(reward_mod, "pair_loss", real)
    part = train_preference_model(cfg, str(tiny_base), data, tmp_path / "part", tmp_path / "lp", "k", progress=False)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (tmp_path / "lp" / "checkpoints").exists()  # cleaned up once the model is saved
    # the log reads as one run: the rows before the checkpoint kept, the ones after it once
    rows = {d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("lf", "lp")}
    assert [(r["step"], sorted(r)) for r in rows["lp"]] == [(r["step"], sorted(r)) for r in rows["lf"]]


def test_score_ids_keeps_no_graph_of_a_trainable_model(tiny_base):
    model, tok = build_reward_model(str(tiny_base), _cfg())
    batch, _ = encode_pairs(tok, EXPECTED, 256)
    seqs = [s for pair in batch for s in pair]
    scores = score_ids(model, seqs, tok.pad_token_id, batch_size=2)
    assert not scores.requires_grad  # no autograd graph kept across batches (memory) when scoring
    # batches cut by token positions score the same
    budget = score_ids(model, seqs, tok.pad_token_id, batch_size=8, max_tokens=2 * max(map(len, seqs)))
    torch.testing.assert_close(budget, scores, atol=1e-5, rtol=1e-5)


def test_scoring_batches_hold_at_most_their_rows_and_padded_positions():
    from direct_rlhf.models.reward_model import length_sorted_chunks

    lengths = [5, 3, 9, 4, 8]  # shortest first: rows 1, 3, 0, 4, 2
    assert list(length_sorted_chunks(lengths, 2)) == [[1, 3], [0, 4], [2]]
    # padded to the batch's longest: 3 x 5 = 15 fits 16; 4 x 8 does not; 2 x 9 does not either
    assert list(length_sorted_chunks(lengths, 8, max_tokens=16)) == [[1, 3, 0], [4], [2]]
    assert list(length_sorted_chunks(lengths, 8, max_tokens=7)) == [[1], [3], [0], [4], [2]]  # over it: alone


def test_length_grouped_batches_hold_every_pair_once_an_epoch_and_pad_less():
    from direct_rlhf.train.reward import length_grouped_batches

    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 200, (301,), generator=gen)]
    batches = length_grouped_batches(lengths, 8, gen, group=4)
    assert sorted(i for b in batches for i in b) == list(range(301))
    assert all(len(b) <= 8 for b in batches)

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    plain = [list(range(301))[i:i + 8] for i in range(0, 301, 8)]
    assert padded(batches) < 0.8 * padded(plain)
    assert length_grouped_batches(lengths, 8, gen, group=4) != batches  # the next epoch, another order


def test_a_checkpoint_of_other_inputs_is_cleared_not_resumed(tmp_path):
    from direct_rlhf.train import checkpoint
    from direct_rlhf.train.reward import _resume

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.save(tmp_path, 9, {"model": model}, {"opt": opt.state_dict(), "sched": sched.state_dict()},
                    {"key": "another run", "epoch": 1, "step": 9, "rng": [checkpoint.rng_state()], "gen": []})
    assert _resume(tmp_path, "this run", model, opt, sched, torch.Generator()) is None
    assert list(tmp_path.glob("step-*")) == []  # it would have outlived this run's own, lower-step ones
