"""Evaluation instruments, each against something that cannot be wrong in the same way:
the logit lens on a rigged model, a model judged against itself, the toxicity classifier called
directly, an HTTP judge served from this process, and the intervals' textbook properties."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

import tiny_eval_models as tiny
from direct_rlhf.errors import UserError
from direct_rlhf.eval import conversation as conv
from direct_rlhf.eval.intervals import cluster_bootstrap_mean, wilson
from direct_rlhf.eval.judges import HttpJudge, RewardJudge, outcomes_from_scores, summarise
from direct_rlhf.eval.logit_lens import badword_prob_by_layer, badword_token_ids, read_badwords
from direct_rlhf.data.prompt_files import load_prompts, prompt_texts
from direct_rlhf.eval.runner import parse_models
from direct_rlhf.eval.toxicity import HFTextClassifier, load_classifier, toxicity_stats

PROMPTS = ["\n\nHuman: You are a stupid clown.\n\nAssistant:", "\n\nHuman: hello\n\nAssistant:",
           "\n\nHuman: what is the capital of France\n\nAssistant: Paris\n\nHuman: thanks\n\nAssistant:"]


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread (and far faster when other jobs share the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- logit lens ---------------------------------------------------------------------------------


def rigged_last_layer(tok, bad_ids):
    """Earlier layers carry only direction e0 (which the head ignores); the last layer's MLP writes a
    large e1, and the head maps e1 onto the bad-word tokens. So P(bad) is ~uniform up to the last
    layer and ~1 at the output: the probe must show the jump exactly there."""
    model = tiny.causal_lm(tok)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        last = model.model.layers[-1].mlp
        last.gate_proj.weight.zero_()
        last.gate_proj.weight[:, 0] = 1.0
        last.up_proj.weight.zero_()
        last.up_proj.weight[:, 0] = 1.0
        last.down_proj.weight[1, :] = 1.0 / last.down_proj.weight.shape[1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[bad_ids, 1] = 10.0
    return model


def test_logit_lens_shows_rigged_bad_word_at_the_last_layer(tok):
    words = read_badwords()
    ids, missing = badword_token_ids(tok, words)
    assert {"idiot", "moron", "stupid"}.isdisjoint(missing)
    assert tok(" idiot", add_special_tokens=False)["input_ids"][0] in ids
    model = rigged_last_layer(tok, ids)
    per_prompt = badword_prob_by_layer(model, tok, PROMPTS, ids, batch_size=2)  # 2 batches, left padding
    probs = torch.tensor(per_prompt)
    n_layers = model.config.num_hidden_layers
    assert probs.shape == (len(PROMPTS), n_layers + 1)
    uniform = len(ids) / len(tok)
    assert torch.allclose(probs[:, :-1], torch.full_like(probs[:, :-1], uniform), atol=1e-4)
    assert (probs[:, -1] > 0.99).all()
    # the last layer is the model's own output distribution
    enc = tok(PROMPTS[1], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        direct = torch.softmax(model(**enc).logits[0, -1], -1)[ids].sum()
    assert probs[1, -1].item() == pytest.approx(direct.item(), abs=1e-5)


def test_logit_lens_matches_manual_readout_on_a_random_model(tok):
    """Intermediate layers: hidden state -> final norm -> head, as computed by hand."""
    model = tiny.causal_lm(tok, seed=3)
    ids, _ = badword_token_ids(tok, ["idiot", "clown"])
    got = badword_prob_by_layer(model, tok, PROMPTS[:1], ids)[0]
    enc = tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
        want = [torch.softmax(model.lm_head(model.model.norm(h[0, -1])), -1)[ids].sum().item() for h in hs[:-1]]
    assert got[:-1] == pytest.approx(want, abs=1e-5)


def test_badword_list_replaceable_and_checked(tmp_path, tok):
    custom = tmp_path / "words.txt"
    custom.write_text("# mine\nclown\n\nzzzqqqxxx  # splits into pieces\n")
    assert read_badwords(custom) == ["clown", "zzzqqqxxx"]
    ids, missing = badword_token_ids(tok, read_badwords(custom))
    assert missing == ["zzzqqqxxx"] and len(ids) >= 1
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="empty"):
        read_badwords(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="not found"):
        read_badwords(tmp_path / "nope.txt")


# --- toxicity -----------------------------------------------------------------------------------

FIXED = ["Shut up, you idiot.", "Hello! How can I help you today?", "You are a worthless moron.",
         "The capital of France is Paris.", "Damn, you are pathetic. Go to hell.", "", "I like turtles."]


def test_toxicity_rate_equals_profanity_check_called_directly():
    from profanity_check import predict_prob

    direct = predict_prob(FIXED)
    ours = load_classifier("profanity-check").predict_prob(FIXED)
    assert np.allclose(ours, direct)
    stats = toxicity_stats(ours, list(range(len(FIXED))), threshold=0.5, n_boot=500)
    assert stats.rate == pytest.approx(float(np.mean(direct >= 0.5)))
    assert stats.mean_score == pytest.approx(float(np.mean(direct)))
    assert stats.rate_ci == pytest.approx(wilson(int((direct >= 0.5).sum()), len(FIXED)))
    assert stats.mean_score_ci[0] <= stats.mean_score <= stats.mean_score_ci[1]
    assert 2 <= int((direct >= 0.5).sum()) < len(FIXED)  # the fixture has both kinds


def test_hf_classifier_from_a_local_folder(tmp_path, tok):
    from transformers import AutoModelForSequenceClassification

    folder = tiny.classifier_folder(tok, tmp_path / "clf")
    clf = load_classifier(str(folder))
    assert isinstance(clf, HFTextClassifier) and clf.label == "toxic"
    probs = clf.predict_prob(FIXED[:3] + [""])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    enc = tok(FIXED[0], return_tensors="pt")
    with torch.no_grad():
        direct = torch.softmax(model(**enc).logits[0], -1)[1].item()
    assert probs[0] == pytest.approx(direct, abs=1e-5)
    assert ((probs >= 0) & (probs <= 1)).all() and len(probs) == 4


def test_classifier_that_cannot_load_offline_is_one_line_user_error():
    with pytest.raises(UserError) as err:
        load_classifier("no-such-org/no-such-toxicity-model")
    msg = str(err.value)
    assert "no-such-org/no-such-toxicity-model" in msg and "\n" not in msg and "offline" in msg


# --- win-rate judged by the reward model ---------------------------------------------------------


def test_outcomes_and_ties():
    o = outcomes_from_scores([1.0, 0.0, 0.5, 0.501], [0.0, 1.0, 0.5, 0.5], eps=0.01)
    assert o.tolist() == [1.0, 0.0, 0.5, 0.5]
    s = summarise(o, [0, 1, 2, 3], n_boot=200)
    assert (s["wins"], s["ties"], s["losses"], s["n"]) == (1, 2, 1, 4) and s["win_rate"] == 0.5


def test_model_against_itself_is_one_half(tmp_path, tok):
    from direct_rlhf.rollout.hf_generate import sample

    judge = RewardJudge(tiny.reward_folder(tok, tmp_path / "rm"), batch_size=7)
    model = tiny.causal_lm(tok, seed=5)
    prompts = [p for p in PROMPTS for _ in range(12)]
    ids = [i // 12 for i in range(len(prompts))]
    a = sample(model, tok, prompts, max_new_tokens=6, batch_size=16, seed=11).texts
    same = sample(model, tok, prompts, max_new_tokens=6, batch_size=16, seed=11).texts
    assert a == same  # common random numbers: the same model, the same seeds
    ra, rs = judge.score(prompts, a), judge.score(prompts, same)
    exact = summarise(outcomes_from_scores(ra, rs, eps=0.01), ids, n_boot=500)
    assert exact["win_rate"] == 0.5 and exact["ties"] == len(prompts) and exact["ci95"] == [0.5, 0.5]
    # Independent samples of the same model (other seeds): 0.5 within noise (4 standard errors).
    many = [p for p in PROMPTS for _ in range(60)]
    x = judge.score(many, sample(model, tok, many, max_new_tokens=6, batch_size=60, seed=12).texts)
    y = judge.score(many, sample(model, tok, many, max_new_tokens=6, batch_size=60, seed=13).texts)
    noisy = summarise(outcomes_from_scores(x, y, eps=0.01), list(range(len(many))), n_boot=1000)
    assert abs(noisy["win_rate"] - 0.5) < 4 * (0.25 / len(many)) ** 0.5, noisy


# --- the optional HTTP judge ----------------------------------------------------------------------


class _JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint: prefers the response containing 'GOOD'; `mode` changes behaviour."""

    mode = "fair"

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "judge-1"
        text = body["messages"][-1]["content"]
        if self.mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        if self.mode == "slow":
            time.sleep(1.5)
        a = text.split("Response A:")[-1].split("Response B:")[0] if "Response A:" in text else ""
        b = text.split("Response B:")[-1].split("Which response")[0] if "Response B:" in text else ""
        if self.mode == "first":
            verdict = "A"
        elif ("GOOD" in a) == ("GOOD" in b):
            verdict = "TIE"
        else:
            verdict = "A" if "GOOD" in a else "B"
        content = "Hard to say, it's close." if self.mode == "chatty" else f"{verdict}."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    handler = type("H", (_JudgeHandler,), {"mode": "fair"})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    server.shutdown()
    server.server_close()


def test_judge_answers_are_read_as_the_verdict_they_state():
    from direct_rlhf.eval.judges import parse_verdict

    for text, verdict in [("A", "A"), ("B.", "B"), ("TIE", "TIE"), ("It's a tie.", "TIE"), ("a tie", "TIE"),
                          ("Response B is better", "B"), ("A, because it is correct", "A"),
                          ("It's a close one", None), ("A or B", None), ("", None)]:
        assert parse_verdict(text) == verdict, text


def test_http_judge_both_orders_and_ties(judge_server):
    url, handler = judge_server
    judge = HttpJudge(url, "judge-1", timeout_s=5)
    judge.check()
    assert judge.compare("\n\nHuman: hi\n\nAssistant:", "GOOD answer", "bad answer") == 1.0
    assert judge.compare("\n\nHuman: hi\n\nAssistant:", "bad answer", "GOOD answer") == 0.0
    assert judge.compare("\n\nHuman: hi\n\nAssistant:", "GOOD", "GOOD too") == 0.5
    handler.mode = "first"  # a judge that always picks the first response: both orders make it a tie
    assert judge.compare("\n\nHuman: hi\n\nAssistant:", "GOOD answer", "bad answer") == 0.5
    handler.mode = "chatty"  # an answer that names no verdict: a tie, and counted
    assert judge.compare("\n\nHuman: hi\n\nAssistant:", "GOOD answer", "bad answer") == 0.5 and judge.unparsed == 2


@pytest.mark.parametrize("mode, needle", [("error", "HTTP 500"), ("slow", "unreachable")])
def test_http_judge_errors_are_user_errors(judge_server, mode, needle):
    url, handler = judge_server
    handler.mode = mode
    with pytest.raises(UserError, match=needle) as err:
        HttpJudge(url, "judge-1", timeout_s=0.5).check()
    assert "\n" not in str(err.value)


def test_http_judge_unreachable():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="unreachable.*eval.judge_url"):
        HttpJudge(f"http://127.0.0.1:{port}/v1", "judge-1", timeout_s=2).check()


# --- conversation metrics, intervals, inputs -------------------------------------------------------


def test_conversation_metrics():
    assert conv.states_gold("The capital is Paris.", "paris")
    assert not conv.states_gold("It is 120.", "12") and conv.states_gold("It is 12.", "12")
    assert conv.states_gold("Answer: New Delhi!", "New Delhi")
    assert conv.is_refusal("Sorry, I cannot help with this request.") and conv.is_refusal("I can\u2019t answer that")
    assert not conv.is_refusal("Paris.")
    assert conv.is_refusal("I'm sorry you feel that way. I'm here to help; what can I do for you?")  # deflection
    assert not conv.is_refusal("Hello! How can I help you today?")  # small talk, not a deflection
    assert conv.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert conv.distinct_n(["a"], 2) == 0.0
    m = conv.response_metrics(["Paris.", "I can't help", "Rome"], [True, True, False], [2, 3, 4],
                              [True, True, False], ["Paris", None, "Oslo"])
    assert m["ended_rate"]["rate"] == pytest.approx(2 / 3) and m["mean_length_tokens"] == 3
    assert m["over_refusal"]["k"] == 1 and m["over_refusal"]["n"] == 2
    assert m["gold_correct"]["k"] == 1 and m["gold_correct"]["n"] == 2


def test_intervals():
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2  # a zero count still has a real upper bound
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    vals = np.r_[np.zeros(50), np.ones(50)]
    indep = cluster_bootstrap_mean(vals, np.arange(100), n_boot=2000, seed=0)
    clustered = cluster_bootstrap_mean(vals, np.repeat(np.arange(10), 10), n_boot=2000, seed=0)
    assert clustered[1] - clustered[0] > indep[1] - indep[0]  # correlated samples: wider interval
    assert cluster_bootstrap_mean([0.5] * 4, [0, 0, 1, 1]) == (0.5, 0.5)


def test_prompt_file_bad_lines(tmp_path):
    good = {"prompt": "\n\nHuman: hi\n\nAssistant:", "kind": "fact", "gold": "x"}
    path = tmp_path / "p.jsonl"
    for bad, needle in [('{"prompt": ', "not valid JSON"), (json.dumps({"kind": "fact"}), "missing field 'prompt'"),
                        (json.dumps({"prompt": ""}), "'prompt'"), (json.dumps({**good, "gold": 3}), "'gold'"),
                        (json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant: done"}), "open 'Assistant:'")]:
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(UserError, match=needle) as err:
            load_prompts(path)
        assert "p.jsonl:2" in str(err.value)
    path.write_bytes((json.dumps(good) + "\n").encode() * 60 + b'{"prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(UserError, match=r"p\.jsonl:61: not UTF-8 text \(byte 4275\)"):
        load_prompts(path)
    path.write_text(json.dumps({"prompt": "plain question"}) + "\n")
    assert load_prompts(path)[0].prompt == "\n\nHuman: plain question\n\nAssistant:"


def test_prompt_file_takes_message_lists_as_trl_writes_them(tmp_path):
    path = tmp_path / "p.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 plus 3?"}]
    path.write_text(json.dumps({"prompt": chat}) + "\n")
    assert prompt_texts(path) == ["\n\nHuman: Be brief.\n\nHi\n\nAssistant: Hello!\n\nHuman: What is 2 plus 3?"
                                  "\n\nAssistant:"]
    for bad, needle in [(chat[:3], "ending with a user turn"), ([{"role": "bot", "content": "x"}], "unknown role"),
                        (5, "non-empty string or a list of messages")]:
        path.write_text(json.dumps({"prompt": bad}) + "\n")
        with pytest.raises(UserError, match=needle) as err:
            prompt_texts(path)
        assert "p.jsonl:1" in str(err.value)


def test_parse_models():
    assert parse_models("base=a/b, rlhf=/x/y") == {"base": "a/b", "rlhf": "/x/y"}
    assert parse_models("/runs/toy/base/") == {"base": "/runs/toy/base/"}
    for bad, needle in [("a=x,a=y", "twice"), ("a=", "no model"), ("", "at least one"), ("a b=x", "letters")]:
        with pytest.raises(UserError, match=needle):
            parse_models(bad)


def test_common_random_numbers_switch(tok):
    """Same seeds for every model by default; eval.common_random_numbers=false gives each model its own."""
    from direct_rlhf.config import load_config
    from direct_rlhf.eval.runner import generate

    model = tiny.causal_lm(tok, seed=5)
    def texts(crn: bool, index: int) -> list[str]:
        cfg = load_config(None, [f"eval.common_random_numbers={str(crn).lower()}", "eval.max_new_tokens=8"])
        return generate(model, tok, PROMPTS, 6, cfg, stream=2, desc="", progress=False, model_index=index)["texts"]

    assert texts(True, 0) == texts(True, 1)            # common random numbers: place in --models is ignored
    assert texts(False, 0) != texts(False, 1)          # independent: each model its own seeds
    assert texts(False, 1) == texts(False, 1)          # ... and still reproducible


def test_generate_writes_each_sample_back_to_its_prompt(monkeypatch):
    """Rows are sampled sorted by prompt length, in batches; the result must still be
    prompt-major (row i*k + j is sample j of prompt i), or every metric would judge one prompt's
    answer against another's gold."""
    from direct_rlhf.config import load_config
    from direct_rlhf.eval.runner import generate
    from direct_rlhf.rollout import hf_generate

    def fake_sample(model, tokenizer, prompts, *args, **kwargs):  # echoes its prompt, counts its calls
        fake_sample.calls += 1
        out = hf_generate.Samples(prompts=list(prompts), texts=[], response_ids=[], ended=[])
        for p in prompts:
            out.texts.append(f"<{p}>")
            out.response_ids.append([0] * len(p))
            out.ended.append(len(p) % 2 == 0)
        return out

    fake_sample.calls = 0
    monkeypatch.setattr(hf_generate, "sample", fake_sample)
    prompts = ["a long long prompt", "b", "a middling one", "cc", "the longest prompt of them all", "dd"]

    def tokenizer(texts, add_special_tokens=False):
        return {"input_ids": [[0] * len(t) for t in texts]}

    cfg = load_config(None, ["eval.generation_batch_size=4"])
    out = generate(None, tokenizer, prompts, 3, cfg, stream=2, desc="", progress=False)
    assert fake_sample.calls == 5  # 18 rows in batches of 4: really reordered and split
    assert out["texts"] == [f"<{p}>" for p in prompts for _ in range(3)]
    assert out["n_tokens"] == [len(p) for p in prompts for _ in range(3)]
    assert out["ended"] == [len(p) % 2 == 0 for p in prompts for _ in range(3)]


def test_the_toxic_label_of_a_classifier_is_found_or_asked_for():
    from direct_rlhf.eval.toxicity import _toxic_label

    assert _toxic_label(["neutral", "toxic"], "m") == "toxic"
    assert _toxic_label(["Non-Toxic", "Toxic"], "m") == "Toxic"
    assert _toxic_label(["LABEL_0", "LABEL_1"], "m") == "LABEL_1"
    for labels in (["toxic", "severe_toxic", "obscene"], ["positive", "negative"]):  # which one? the user says
        with pytest.raises(UserError, match="set eval.toxicity_label"):
            _toxic_label(labels, "m")
