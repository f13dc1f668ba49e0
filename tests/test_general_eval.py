"""lm-eval-harness as the general-capability engine: in-process scores, CLI parity, bad input, a rigged model.

Everything is offline: a byte-level BPE tokenizer trained here and a random 2-layer Mistral.
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from direct_rlhf.errors import UserError  # noqa: E402
from direct_rlhf.eval.general import (  # noqa: E402
    TOY_FAMILIES, evaluate_general, validate_mc_file, write_toy_tasks,
)

SRC = Path(__file__).resolve().parents[1] / "src"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Norway", "Oslo"), ("Peru", "Lima"),
            ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Chile", "Santiago")]
ANIMALS = ["cat", "dog", "bird", "fish"]


def write_mc(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Saved tiny model + tokenizer, an MC folder (2 families x 8) and its materialised task folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("general")
    rng = random.Random(0)
    words = [w for pair in CAPITALS for w in pair] + ANIMALS + (
        "Which city is the capital of What plus Question Answer one two three".split())
    sents = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(400)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sents, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    mc = root / "mc"
    caps = []
    for country, city in CAPITALS:
        choices = [city] + rng.sample([c for _, c in CAPITALS if c != city], 3)
        rng.shuffle(choices)
        caps.append({"question": f"Which city is the capital of {country}?", "choices": choices,
                     "answer": choices.index(city), "subject": country})
    adds = []
    for _ in range(8):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        choices = [str(a + b), str(a + b + 1), str(a + b - 1)]
        rng.shuffle(choices)
        adds.append({"question": f"What is {a} plus {b}?", "choices": choices,
                     "answer": choices.index(str(a + b)), "subject": "addition"})
    write_mc(mc / "capitals.jsonl", caps)
    write_mc(mc / "addition.jsonl", adds)
    tasks = write_toy_tasks(mc, root / "tasks")
    return {"root": root, "model_dir": model_dir, "model": model, "tok": tok, "mc": mc, "tasks": tasks}


def test_toy_tasks_written_for_present_families(world):
    names = sorted(p.stem for p in world["tasks"].glob("*.yaml"))
    assert names == ["toy_addition", "toy_capitals", "toy_general"]
    assert {"capitals", "addition"} <= set(TOY_FAMILIES) and len(TOY_FAMILIES) == 11
    assert str(world["mc"].resolve() / "capitals.jsonl") in (world["tasks"] / "toy_capitals.yaml").read_text()


def test_evaluate_general_in_process(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval must write nothing into the working directory
    model = world["model"]
    model.train()
    torch.manual_seed(7)
    rng_before = torch.random.get_rng_state()
    res = evaluate_general(model, world["tok"], ["toy_capitals", "toy_addition", "toy_general"],
                           world["tasks"], batch_size=8)
    assert list(tmp_path.iterdir()) == []
    assert model.training, "the caller's train/eval mode is restored"
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global torch RNG left alone"
    model.eval()
    for name in ("toy_capitals", "toy_addition"):
        assert res[name]["n"] == 8
        for key in ("acc", "acc_norm"):
            assert 0.0 <= res[name][key] <= 1.0
            assert res[name][key + "_stderr"] >= 0.0
    assert res["toy_general"]["n"] == 16
    assert res["toy_general"]["acc"] == pytest.approx((res["toy_capitals"]["acc"] + res["toy_addition"]["acc"]) / 2)
    assert res["_mean"]["acc"] == pytest.approx(sum(res[t]["acc"] for t in ("toy_capitals", "toy_addition", "toy_general")) / 3)
    limited = evaluate_general(model, world["tok"], ["toy_capitals"], world["tasks"], batch_size=8, limit=3)
    assert limited["toy_capitals"]["n"] == 3


def test_progress_false_silences_lm_evals_own_bars(world, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside any git repository
    evaluate_general(world["model"], world["tok"], ["toy_capitals"], world["tasks"], batch_size=8, limit=3)
    err = capfd.readouterr().err
    bars = [seg for seg in re.split(r"[\r\n]", err) if "it/s]" in seg]
    # by default only the bar of the model's own work; the instant per-task ones stay hidden
    assert bars and all(seg.lstrip().startswith("Running loglikelihood requests") for seg in bars)
    assert "not a git repository" not in err  # lm-eval's commit probe is kept off the terminal
    evaluate_general(world["model"], world["tok"], ["toy_capitals"], world["tasks"], batch_size=8, limit=3,
                     progress=False)
    assert "it/s]" not in capfd.readouterr().err
    import lm_eval.api.task
    from tqdm import tqdm
    assert lm_eval.api.task.tqdm is tqdm  # put back afterwards


def test_matches_lm_eval_command_line(world, tmp_path):
    res = evaluate_general(world["model"], world["tok"], ["toy_capitals", "toy_addition"], world["tasks"], batch_size=8)
    out = tmp_path / "cli"
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={world['model_dir']},dtype=float32", "--device", "cpu",
         "--tasks", "toy_capitals,toy_addition", "--include_path", str(world["tasks"]),
         "--batch_size", "8", "--output_path", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    cli = json.loads(result_file.read_text())["results"]
    for name in ("toy_capitals", "toy_addition"):
        assert res[name]["acc"] == pytest.approx(cli[name]["acc,none"], abs=1e-6)
        assert res[name]["acc_norm"] == pytest.approx(cli[name]["acc_norm,none"], abs=1e-6)
        assert res[name]["acc_stderr"] == pytest.approx(cli[name]["acc_stderr,none"], abs=1e-6)


GOOD = {"question": "Which city is the capital of Peru?", "choices": ["Lima", "Rome"], "answer": 0}


@pytest.mark.parametrize("bad, problem", [
    ('{"question": "Q?", "choices": ["a", "b"], "answer": 0', "not valid JSON"),
    (json.dumps({**GOOD, "answer": 2}), "'answer'"),
    (json.dumps({**GOOD, "answer": True}), "'answer'"),
    (json.dumps({**GOOD, "choices": ["only one"]}), "'choices'"),
    (json.dumps({**GOOD, "choices": ["a", 3]}), "'choices'"),
    (json.dumps({**GOOD, "question": "  "}), "'question'"),
    (json.dumps({"question": "Q?", "choices": ["a", "b"]}), "missing field 'answer'"),
])
def test_malformed_mc_line_names_file_and_line(tmp_path, bad, problem):
    mc = tmp_path / "mc"
    path = mc / "colours.jsonl"
    write_mc(path, [GOOD, GOOD])
    path.write_text(path.read_text() + bad + "\n")
    for call in (lambda: validate_mc_file(path), lambda: write_toy_tasks(mc, tmp_path / "tasks")):
        with pytest.raises(UserError) as err:
            call()
        assert "colours.jsonl:3:" in str(err.value) and problem in str(err.value)


def test_missing_mc_folder_and_unknown_task(world, tmp_path):
    with pytest.raises(UserError, match="no MC files"):
        write_toy_tasks(tmp_path, tmp_path / "tasks")
    with pytest.raises(UserError, match="unknown lm-eval task 'toy_nope'"):
        evaluate_general(world["model"], world["tok"], ["toy_nope"], world["tasks"])


def rigged_model(world, word: str):
    """Residual stream = a constant embedding (attention/MLP outputs zeroed), so every position
    predicts the same distribution: the tokens of `" " + word` get logit 30, everything else 0."""
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(world["model_dir"]).eval()
    favoured = world["tok"](" " + word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[favoured] = 30.0 / model.config.hidden_size
    return model, set(favoured)


def test_rigged_model_scores_one_and_zero(world, tmp_path):
    model, favoured = rigged_model(world, "dog")
    for other in ("cat", "bird", "fish"):  # every other choice needs a token the model hates
        assert set(world["tok"](" " + other, add_special_tokens=False)["input_ids"]) - favoured
    rng = random.Random(3)
    always, never = [], []
    for i in range(8):
        choices = ANIMALS[:]
        rng.shuffle(choices)
        q = f"Question {i}: which animal?"
        always.append({"question": q, "choices": choices, "answer": choices.index("dog")})
        never.append({"question": q, "choices": choices, "answer": (choices.index("dog") + 1) % 4})
    write_mc(tmp_path / "always" / "animal_classes.jsonl", always)
    write_mc(tmp_path / "never" / "animal_classes.jsonl", never)
    for sub, expected in (("always", 1.0), ("never", 0.0)):
        tasks = write_toy_tasks(tmp_path / sub, tmp_path / f"tasks_{sub}")
        res = evaluate_general(model, world["tok"], ["toy_animal_classes"], tasks, batch_size=8)
        assert res["toy_animal_classes"]["acc"] == expected
        assert res["toy_animal_classes"]["acc_norm"] == expected


def test_standard_task_offline_is_one_line_user_error(world, tmp_path):
    """Run in a child with an empty HF cache, so the outcome never depends on this machine's cache."""
    script = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from direct_rlhf.errors import UserError\n"
        "from direct_rlhf.eval.general import evaluate_general\n"
        f"d = {str(world['model_dir'])!r}\n"
        "m, t = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)\n"
        "try:\n"
        "    evaluate_general(m, t, ['arc_easy'], None, limit=2)\n"
        "except UserError as e:\n"
        "    print('USERERROR:' + str(e))\n"
    )
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "ds"),
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("USERERROR:")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    msg = lines[0]
    assert "arc_easy" in msg and "HF datasets cache" in msg and "\n" not in msg
