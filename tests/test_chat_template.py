"""`model.chat_format=template`: a model that has a chat template of its own is given its own
template instead of the HH transcript, in every stage (data/chat_format.py `ChatFormat`). Tested on
the real families' tokenizer layouts (tests/tokenizer_layouts.py), offline, with tiny models."""

from __future__ import annotations

import json
import types

import pytest
import torch
from tokenizer_layouts import LAYOUTS, build_tokenizer, tiny_llama

from direct_rlhf.chat import chat
from direct_rlhf.cli import main
from direct_rlhf.config import load_config
import direct_rlhf.data.chat_format as cf
from direct_rlhf.data.chat_format import END_OF_TURN, Message, prompt_ids, render
from direct_rlhf.data.preferences import load_pairs
from direct_rlhf.data.prompt_files import load_prompts, prompt_texts
from direct_rlhf.data.prompt_truncation import fit_prompts
from direct_rlhf.errors import UserError
from direct_rlhf.models.loading import load_tokenizer
from direct_rlhf.models.reward_model import encode
from direct_rlhf.rollout.hf_generate import sample
from direct_rlhf.train.ppo import assemble
from direct_rlhf.train.sft import sft_example

# SmolLM2-Instruct's ChatML template (EOS is <|im_end|>), and a Llama-2 / Mistral-style one that
# writes the BOS text itself, as theirs do.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
          "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

QUESTION = "What is the capital of France?"
CONVERSATION = [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why?"},
                {"role": "user", "content": QUESTION}]


def model_folder(path, layout: str, template: str | None):
    """A tiny Llama with a `layout` tokenizer whose chat template is `template` (None: none)."""
    tok = build_tokenizer(layout, path)
    tok.chat_template = template
    tok.save_pretrained(path)
    tiny_llama(tok).save_pretrained(path)
    return str(path), load_tokenizer(path)


def template(tok, messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chatml(tmp_path):
    return model_folder(tmp_path / "chatml", "smollm2", CHATML)


def test_ppo_and_eval_prompts_are_the_templates_rendering(chatml, tmp_path):
    """Prompt files in each accepted shape (messages, plain text, HH transcript) reach PPO and the
    evaluation as the template's rendering with its generation prompt; a prompt too long loses its
    oldest turns whole, on the message list, and is still the template's rendering of what is left."""
    from direct_rlhf.eval.runner import fit_to_models

    path, tok = chatml
    hh = render([Message(m["role"], m["content"]) for m in CONVERSATION])
    file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": CONVERSATION}, {"prompt": QUESTION}, {"prompt": hh}])
    expected = [template(tok, c, True) for c in (CONVERSATION, [{"role": "user", "content": QUESTION}], CONVERSATION)]

    ppo, n_cut, _ = fit_prompts(prompt_texts(file), path, False, 256, 16, "ppo", "template")
    assert ppo == expected and n_cut == 0
    assert fit_prompts(prompt_texts(file), path, False, 256, 16, "ppo")[0] == prompt_texts(file)  # hh: unchanged

    cfg = load_config(None, [f"model.base={path}", "model.chat_format=template"])
    evaluated, n_cut = fit_to_models(load_prompts(file), {"base": path, "rlhf": path}, cfg)
    assert [p.prompt for p in evaluated] == expected and n_cut == 0

    long = [{"role": r, "content": f"{QUESTION} ({i})" if r == "user" else "Paris."}
            for i in range(40) for r in ("user", "assistant")] + [{"role": "user", "content": "And Spain?"}]
    [cut], n_cut, budget = fit_prompts([render(long)], path, False, 64, 16, "ppo", "template")
    tails = [template(tok, long[k:], True) for k in range(0, len(long), 2)]
    fitting = [t for t in tails if len(tok(t, add_special_tokens=False)["input_ids"]) <= budget]
    assert n_cut == 1 and cut == fitting[0] and cut.endswith("And Spain?<|im_end|>\n<|im_start|>assistant\n")


def test_reward_sft_and_ppo_get_the_templates_rendering_through_the_pipeline(chatml, tmp_path, monkeypatch):
    """Pairs in every accepted format become prompt + response = the template's rendering with the
    assistant message included, up to its end of turn (a token: SFT appends EOS, PPO samples it),
    for the reward model and SFT; PPO's prompts (from the pairs) are the template's prompts."""
    import direct_rlhf.train.ppo as ppo_module
    import direct_rlhf.train.reward as reward_module
    import direct_rlhf.train.sft as sft_module
    from direct_rlhf.pipeline import ensure_policy, ensure_reward, ensure_sft

    path, tok = chatml
    user, answer = {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."}
    rows = [{"chosen": f"\n\nHuman: {QUESTION}\n\nAssistant: Paris.", "rejected": f"\n\nHuman: {QUESTION}\n\nAssistant: Rome."},
            {"prompt": [user], "chosen": [answer], "rejected": [{"role": "assistant", "content": "Rome."}]},
            {"prompt": QUESTION, "chosen": "Paris.", "rejected": "Rome."}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(None, [f"out={tmp_path / 'run'}", f"model.base={path}", "model.chat_format=template",
                             f"reward.data={data}", f"reward.eval_data={data}", "ppo.ptx_coef=0",
                             "ppo.select=last", "ppo.eval_every=0"])  # no validation files: no balance guard
    seen = {}

    class Given(Exception):
        pass

    def stop(name):
        def record(*args, **kwargs):
            seen[name] = args
            raise Given  # enough: what the stage was given
        return record

    monkeypatch.setattr(reward_module, "train_preference_model", stop("reward"))
    monkeypatch.setattr(sft_module, "train_sft", stop("sft"))
    monkeypatch.setattr(ppo_module, "PPOTrainer", stop("ppo"))
    for stage in (ensure_reward, ensure_sft):
        with pytest.raises(Given):
            stage(cfg, progress=False)
    full, prompt = template(tok, [user, answer], False), template(tok, [user], True)
    assert full == prompt + "Paris.<|im_end|>\n"
    pairs = seen["reward"][2].train + seen["reward"][2].eval
    assert len(pairs) == 6 and all((p.prompt, p.chosen, p.rejected) == (prompt, "Paris.", "Rome.") for p in pairs)
    assert all((p.prompt, p.chosen) == (prompt, "Paris.") for p in seen["sft"][2])
    # the reward model reads that text; SFT trains on it through the end of turn (here EOS = <|im_end|>)
    p = pairs[0]
    assert tok.decode(encode(tok, [p.prompt], [p.chosen], 256)[0][0]) == prompt + "Paris."
    assert tok.decode(sft_example(tok, p.prompt, p.chosen, 256)[0]) == full.rstrip("\n")
    monkeypatch.setattr("direct_rlhf.pipeline.ensure_reward", lambda cfg, progress=True: str(tmp_path / "rm"))
    with pytest.raises(Given):
        ensure_policy(cfg, progress=False)
    assert seen["ppo"][3] == [prompt]
    # the default keeps the HH transcript
    assert {(p.prompt, p.chosen) for p in load_pairs(data)[0]} == {(f"\n\nHuman: {QUESTION}\n\nAssistant:", " Paris.")}


@pytest.mark.parametrize("tokenizer_adds_bos", [True, False])
def test_bos_appears_once_when_the_template_writes_it(tmp_path, monkeypatch, tokenizer_adds_bos):
    """Llama-2 and Mistral templates write "<s>" themselves; their tokenizers also add BOS. Every
    role (generation, the reward model, SFT, PPO's rows) sees exactly one BOS, first. A tokenizer
    that adds none keeps the template's, tokenised as the BOS token."""
    layout = "llama" if tokenizer_adds_bos else "llama-without-bos"
    monkeypatch.setitem(LAYOUTS, "llama-without-bos", {**LAYOUTS["llama"], "add_bos": False})
    path, tok = model_folder(tmp_path / "m", layout, LLAMA2)
    fmt = cf.chat_format("template", tok, path)
    messages = [Message(m["role"], m["content"]) for m in CONVERSATION] + [Message("assistant", "Paris.")]
    prompt, response = fmt.prompt_response(messages)
    assert template(tok, CONVERSATION, True).startswith("<s>") and response == " Paris."
    assert prompt.startswith("<s>") is not tokenizer_adds_bos
    [fitted], _, _ = fit_prompts([render(messages[:-1])], path, False, 256, 16, "ppo", "template")
    bos = tok.bos_token_id
    rows = {"generation": prompt_ids(tok, [prompt])[0], "fitted prompt": prompt_ids(tok, [fitted])[0],
            "reward model": encode(tok, [prompt], [response], 256)[0][0],
            "sft": sft_example(tok, prompt, response, 256)[0],
            "ppo rows": assemble(tok, [prompt], [tok(response, add_special_tokens=False)["input_ids"]])[0][0].tolist()}
    for role, ids in rows.items():
        assert ids.count(bos) == 1 and ids[0] == bos, role


def test_a_response_stops_at_the_templates_end_of_turn(tmp_path, monkeypatch, chatml):
    """SmolLM2's base tokenizer: EOS is <|endoftext|> but its ChatML template ends a turn with
    <|im_end|>, so that string stops a response too (PPO, evaluation and chat pass it to sampling);
    where the template's end of turn is EOS (SmolLM2-Instruct), EOS alone does, and an HH marker still does."""
    import direct_rlhf.eval.runner as runner
    import direct_rlhf.rollout.hf_generate as hf_generate
    from direct_rlhf.train.ppo import PPOTrainer

    assert cf.chat_format("template", chatml[1]).stop_strings == END_OF_TURN  # <|im_end|> is EOS there
    monkeypatch.setitem(LAYOUTS, "chatml-base", {**LAYOUTS["smollm2"], "eos": "<|endoftext|>", "pad": "<|endoftext|>"})
    path, tok = model_folder(tmp_path / "base", "chatml-base", CHATML)
    fmt = cf.chat_format("template", tok, path)
    assert fmt.stop_strings == (*END_OF_TURN, "<|im_end|>")
    assert fmt.truncate(" Paris.\n\nHuman: and Spain?") == (" Paris.", True)

    word, end = tok(" Paris", add_special_tokens=False)["input_ids"][0], tok.convert_tokens_to_ids("<|im_end|>")
    script = [word, word, end] + [word] * 20  # what the model says, one token a step
    model, steps = tiny_llama(tok), []

    def force(module, inputs, logits):
        bias = torch.zeros(logits.shape[-1])
        bias[script[len(steps)]] = 1e4
        steps.append(1)
        return logits + bias

    model.lm_head.register_forward_hook(force)
    prompt = fmt.prompt([Message("user", QUESTION)])
    out = sample(model, tok, [prompt], 8, greedy=True, stop_strings=fmt.stop_strings)
    assert out.response_ids == [[word, word, end]] and out.ended == [True] and out.texts == [tok.decode([word, word])]

    # the stages pass the format's stop strings to sampling
    got = []

    def fake(model, tokenizer, prompts, *args, stop_strings=None, **kwargs):
        got.append(stop_strings)
        return hf_generate.Samples(list(prompts), ["x"] * len(prompts), [[1]] * len(prompts), [True] * len(prompts))
    monkeypatch.setattr(hf_generate, "sample", fake)
    monkeypatch.setattr("direct_rlhf.train.ppo.sample", fake)
    monkeypatch.setattr("direct_rlhf.chat.sample", fake)
    cfg = load_config(None, [f"model.base={path}", "model.chat_format=template"])
    runner.generate(model, tok, [prompt], 1, cfg, runner.CONVERSATION_STREAM, "x", False)
    trainer = types.SimpleNamespace(pc=cfg.ppo, acc=types.SimpleNamespace(unwrap_model=lambda m: m), actor=model,
                                    vllm=None, rollout_copy=None, tokenizer=tok, _autocast=torch.no_grad,
                                    chat=cf.chat_format(cfg.model.chat_format, tok, path))
    PPOTrainer._rollout(trainer, [prompt])
    chat(path, stdin=_Lines(QUESTION), stdout=_Lines(), chat_format_name="template")
    assert got == [fmt.stop_strings] * 3


class _Lines:
    """A pipe for chat(): reads the given lines, swallows what is written."""

    def __init__(self, *lines: str):
        self.lines = [line + "\n" for line in lines]

    def isatty(self) -> bool:
        return False

    def readline(self) -> str:
        return self.lines.pop(0) if self.lines else ""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_a_tokenizer_without_a_chat_template_is_one_line_exit_2(tmp_path, capsys):
    """Named: the model and the key. The toy model has no template either: refused before pretraining."""
    path, _ = model_folder(tmp_path / "plain", "llama", None)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": QUESTION, "chosen": "Paris.", "rejected": "Rome."}] * 4)
    capsys.readouterr()  # the folder's own progress bars
    assert main(["-q", "reward", "--out", str(tmp_path / "run"), f"model.base={path}", "model.chat_format=template",
                 f"reward.data={data}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "model.chat_format" in lines[0] and "no chat template" in lines[0]
    with pytest.raises(UserError, match="--chat-format"):
        chat(path, stdin=_Lines(QUESTION), stdout=_Lines(), chat_format_name="template")
    from conftest import MICRO

    assert main(["-q", "reward", "--out", str(tmp_path / "toy"), *MICRO, "model.chat_format=template"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.base: null" in lines[0] and "model.chat_format" in lines[0]
    assert not (tmp_path / "toy" / "base").exists()
