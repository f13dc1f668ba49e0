"""Pretraining smoke test on a micro config: the loss falls and plain transformers loads the result."""

from __future__ import annotations

import json

import torch
from conftest import MICRO
from transformers import AutoModelForCausalLM, AutoTokenizer

from direct_rlhf.cli import main


def test_pretrain_micro_loss_falls_and_folder_loads_without_project_code(tmp_path):
    assert main(["-q", "pretrain", "--out", str(tmp_path), *MICRO]) == 0
    rows = [json.loads(line) for line in (tmp_path / "logs/pretrain/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    base = tmp_path / "base"
    assert (base / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config.model_type == "mistral"
    text = "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE round-trips exactly
    assert tok.eos_token is not None and tok.pad_token is not None and tok.pad_token != tok.eos_token
    # the saved weights are the trained ones: far better on the world's text than the same model untrained
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(model.config)
    batch = torch.tensor([ids])
    with torch.no_grad():
        trained_loss, fresh_loss = (m(input_ids=batch, labels=batch).loss.item() for m in (model, untrained))
    assert trained_loss < 0.8 * fresh_loss, (trained_loss, fresh_loss)
    # a second run with the same config reuses the cached folder
    stamp = (base / "stage.json").read_text()
    mtime = (base / "model.safetensors").stat().st_mtime_ns
    assert main(["-q", "pretrain", "--out", str(tmp_path), *MICRO]) == 0
    assert (base / "stage.json").read_text() == stamp and (base / "model.safetensors").stat().st_mtime_ns == mtime
