"""The SFT baseline: the loss covers the final assistant response only."""

from __future__ import annotations

import torch
from conftest import MICRO
from transformers import AutoModelForCausalLM, AutoTokenizer

from direct_rlhf.cli import main
from direct_rlhf.train.sft import IGNORE, collate, sft_example


def test_sft_labels_mask_everything_but_the_final_response(tmp_path):
    assert main(["-q", "sft", "--out", str(tmp_path), *MICRO, "sft.epochs=1", "sft.batch_size=16"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is the capital of France?\n\nAssistant:"
    response = " The capital of France is Paris."
    ids, labels = sft_example(tok, prompt, response, max_len=256)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt  # earlier turns, human turns: context only
    assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == response
    # the model's loss equals the mean NLL of the response tokens alone, computed by hand
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    x, attn, y = collate([(ids, labels)], tok.pad_token_id)
    loss = model(input_ids=x, attention_mask=attn, labels=y).loss
    logp = model(input_ids=x).logits.log_softmax(-1)[0]
    nll = [-logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))]
    assert torch.allclose(loss, torch.stack(nll).mean(), atol=1e-5)
    # left truncation keeps the whole response
    ids2, labels2 = sft_example(tok, prompt, response, max_len=len(ids) - n_prompt + 2)
    assert labels2[-len(labels) + n_prompt:] == labels[n_prompt:] and len(ids2) == len(ids) - n_prompt + 2


def test_sft_skip_invalid_records_what_it_dropped_in_run_info(tmp_path):
    import json

    world = tmp_path / "world"
    assert main(["-q", "toyworld", "--out", str(world), *MICRO]) == 0
    broken = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: more?",  # ends in a Human turn
                         "rejected": "\n\nHuman: a\n\nAssistant: y"})
    rows = (world / "pairs_train.jsonl").read_text().splitlines()[:40] + [broken]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    args = ["-q", "sft", "--out", str(tmp_path / "run"), *MICRO, f"sft.data={tmp_path / 'd.jsonl'}", "sft.epochs=1",
            "sft.batch_size=16", "pretrain.steps=5"]
    assert main(args) == 2  # the broken record stops the run, with its file and line
    assert main([*args, "sft.skip_invalid=true"]) == 0
    load = json.loads((tmp_path / "run" / "sft" / "run_info.json").read_text())["data_load"]
    assert (load["rows"], load["skipped_invalid"]) == (41, 1) and "d.jsonl:41: " in load["first_invalid"]
    # without sft.data, SFT trains on the reward model's preference data, not silently on the toy world's
    args = ["-q", "sft", "--out", str(tmp_path / "run2"), *MICRO, f"reward.data={tmp_path / 'd.jsonl'}",
            "reward.skip_invalid=true", "sft.epochs=1", "sft.batch_size=16", "pretrain.steps=5"]
    assert main(args) == 0
    load = json.loads((tmp_path / "run2" / "sft" / "run_info.json").read_text())["data_load"]
    assert load["source"].endswith("d.jsonl") and load["skipped_invalid"] == 1
