"""The two I/O guarantees every stage relies on: nothing half-written, bad lines named."""

from __future__ import annotations

import json

import pytest

from direct_rlhf.errors import UserError
from direct_rlhf.io import atomic_dir, atomic_file, read_jsonl


def test_a_write_that_fails_midway_leaves_the_old_artifact_whole_and_no_temporary_behind(tmp_path):
    folder = tmp_path / "stage"
    with atomic_dir(folder) as tmp:
        (tmp / "stage.json").write_text("old")
        (tmp / "weights").write_text("old weights")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "stage.json").write_text("new")
        raise RuntimeError("killed while writing")
    assert sorted(p.name for p in folder.iterdir()) == ["stage.json", "weights"]
    assert (folder / "stage.json").read_text() == "old"
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed while writing")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "stage"]  # no temporaries left
    with atomic_dir(folder) as tmp:  # a finished write replaces the folder whole
        (tmp / "stage.json").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["stage.json"]


def test_jsonl_lines_are_named_by_number_blank_lines_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2}) + "\n")
    assert [(r["a"], r["_line"]) for r in read_jsonl(path, required=("a",))] == [(1, 1), (2, 3)]
    path.write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"b": 2}) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl:3: missing field 'a'"):
        read_jsonl(path, required=("a",))


def test_a_byte_order_mark_is_read_as_nothing_wherever_jsonl_is_read(tmp_path):
    """Windows editors start UTF-8 files with a BOM: the first record must still parse, in every
    reader (preference pairs, prompt files, PPO-ptx text and evaluation prompts all use read_jsonl)."""
    from direct_rlhf.data.preferences import load_pairs
    from direct_rlhf.data.prompt_files import load_prompts

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: yes",
                                 "rejected": "\n\nHuman: a\n\nAssistant: no"}) + "\n", encoding="utf-8-sig")
    assert pairs.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_pairs(pairs)[0][0].chosen == " yes"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "kind": "fact"}) + "\n", encoding="utf-8-sig")
    assert load_prompts(prompts)[0].kind == "fact"
    text = tmp_path / "ptx.jsonl"
    text.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "\ufeffb"}) + "\n", encoding="utf-8-sig")
    assert [r["text"] for r in read_jsonl(text, required=("text",))] == ["a", "\ufeffb"]  # only the file's first


def test_a_gguf_model_enters_stage_keys_by_its_contents(tmp_path):
    """model.base=x.gguf: a file replaced in place makes the stages built on it run again (a folder
    or hub id is keyed as written, one of our artifacts by its own key)."""
    from direct_rlhf.artifacts import model_identity, stamp

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights one")
    first = model_identity(gguf)
    gguf.write_bytes(b"weights two, a new file")
    assert model_identity(gguf) != first
    assert model_identity("org/model") == "org/model"
    (tmp_path / "ours").mkdir()
    stamp(tmp_path / "ours", "abc123", stage="reward")
    assert model_identity(tmp_path / "ours") == "abc123"
