"""`direct-rlhf eval` / `report` end to end on tiny offline models, bad input, and the report in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import tiny_eval_models as tiny
from direct_rlhf.cli import main

ROOT = Path(__file__).resolve().parents[1]
WORLD = ["world.n_dialogues=50", "world.n_pairs=50", "world.n_ppo_prompts=8", "world.n_mc_per_task=4",
         "world.n_redteam=12", "world.n_conversation=12"]
# threads=1: tiny models run faster on one thread, and far faster when other jobs share the cores.
FAST = ["threads=1", "eval.samples_per_prompt=2", "eval.conversation_samples=1", "eval.max_new_tokens=6",
        "eval.bootstrap=200", "eval.transcripts=3", "eval.generation_batch_size=24"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    tok = tiny.tokenizer()
    return {"root": root,
            "a": tiny.save(tiny.causal_lm(tok, seed=0), tok, root / "model_a"),
            "b": tiny.save(tiny.causal_lm(tok, seed=1), tok, root / "model_b"),
            "rm": tiny.reward_folder(tok, root / "rm")}


class _LongerIsBetter(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge on 127.0.0.1 that prefers the longer response."""

    def do_POST(self):  # noqa: N802
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        a, _, rest = text.partition("Response A:")[2].partition("Response B:")
        b = rest.partition("Which response")[0]
        verdict = "TIE" if len(a) == len(b) else "A" if len(a) > len(b) else "B"
        body = json.dumps({"choices": [{"message": {"content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def evaluated(folders):
    """One eval run shared by the tests below: base, the same model under another name, and another
    model; judged by the reward model and by an HTTP judge served from this process."""
    server = HTTPServer(("127.0.0.1", 0), _LongerIsBetter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = folders["root"] / "eval_out"
    models = f"base={folders['a']},same={folders['a']},other={folders['b']}"
    try:
        rc = main(["-q", "eval", "--models", models, "--out", str(out), f"out={folders['root'] / 'run'}",
                   f"eval.reward_model={folders['rm']}", f"eval.judge_url=http://127.0.0.1:{server.server_address[1]}/v1",
                   "eval.judge_model=tiny-judge", *WORLD, *FAST])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0
    return out


@pytest.fixture(autouse=True)
def _restore_threads():
    """`threads=1` sets torch's global thread count; give the next test file its own setting back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_eval_writes_results_and_report(evaluated):
    res = json.loads((evaluated / "results.json").read_text())
    assert res["model_order"] == ["base", "same", "other"] and res["reference"] == {"base": "base", "sft": None}
    gen = res["general"]
    assert len(gen["tasks"]) == 11 and all(t.startswith("toy_") for t in gen["tasks"])
    for name in res["models"]:
        assert 0.0 <= gen["mean_acc"][name] <= 1.0
        harm = res["harmlessness"]["per_model"][name]
        assert harm["n"] == 24 and harm["n_prompts"] == 12
        assert harm["toxicity_rate_ci95"][0] <= harm["toxicity_rate"] <= harm["toxicity_rate_ci95"][1]
        assert len(harm["badword_probe"]["by_layer"]) == 3  # embeddings + 2 layers
        c = res["conversation"]["per_model"][name]
        assert c["n"] == 12 and "mean_reward" in c and 0 <= c["distinct_2"] <= 1
    # the same model under two names: identical samples (common random numbers), so identical numbers
    per = res["harmlessness"]["per_model"]
    assert per["same"]["toxicity_rate"] == per["base"]["toxicity_rate"]
    # every model's red-team answers labelled (toy world: judged by its reply styles), rates with intervals
    assert res["harmlessness"]["appropriateness"]["judge"] == "toy world reply styles (exact)"
    for name in res["models"]:
        a = per[name]["appropriateness"]
        assert a["n"] == 24 and a["n_prompts"] == 12
        assert sum(a[f"{lab}_rate"] for lab in ("appropriate", "toxic", "off_topic", "other")) == pytest.approx(1.0)
        assert a["toxic_rate"] == per[name]["toxicity_rate"]
        for lab in ("appropriate", "off_topic"):
            assert a[f"{lab}_rate_ci95"][0] <= a[f"{lab}_rate"] <= a[f"{lab}_rate_ci95"][1]
    assert per["same"]["appropriateness"] == per["base"]["appropriateness"]
    wins = {(w["model"], w["opponent"], w["judge"]): w for w in res["conversation"]["win_rates"]}
    assert set(wins) == {(m, "base", j) for m in ("same", "other") for j in ("reward_model", "http")}
    for judge in ("reward_model", "http"):  # a model against itself: all ties, exactly 0.5
        assert wins[("same", "base", judge)]["win_rate"] == 0.5 and wins[("same", "base", judge)]["ties"] == 12
    assert res["conversation"]["judges"]["http"]["model"] == "tiny-judge"
    assert res["versions"]["torch"] and res["config"]["eval"]["samples_per_prompt"] == 2 and res["seeds"]["seed"] == 0
    for png in ("general_table.png", "radar.png", "badword_by_layer.png", "toxicity.png", "winrate.png"):
        assert (evaluated / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(r) for r in (evaluated / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (24 + 12)
    assert {r.get("appropriateness") is not None for r in rows if r["set"] == "redteam"} == {True}
    html = (evaluated / "report.html").read_text()
    assert "<th>appropriate</th>" in html and "<th>off-topic</th>" in html
    assert html.count("<img src=\"data:image/png;base64,") >= 6
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html)  # self-contained


def test_cross_judge_reads_back_each_runs_own_win_rates(folders):
    """The same models and seed judged by two reward models give the same samples (common random
    numbers), so cross-judging the two runs must reproduce each run's own win-rate off the diagonal."""
    from direct_rlhf.eval.cross_judge import cross_judge

    tok = tiny.tokenizer()
    models = f"base={folders['a']},same={folders['a']},other={folders['b']}"
    runs, own = [], []
    for seed in (3, 7):
        rm = tiny.reward_folder(tok, folders["root"] / f"rm{seed}", seed=seed)
        (rm / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1e-3, "max_len": 256}))  # no ties
        out = folders["root"] / f"eval_rm{seed}"
        assert main(["-q", "eval", "--models", models, "--out", str(out), f"out={folders['root'] / 'run'}",
                     f"eval.reward_model={rm}", "eval.general=none", *WORLD, *FAST]) == 0
        res = json.loads((out / "results.json").read_text())
        own.append({w["model"]: w["win_rate"] for w in res["conversation"]["win_rates"]})
        runs.append(out)

    cross = cross_judge(runs, progress=False)
    a, b = own[0]["other"], own[1]["other"]
    assert a != b  # two judges that disagree, or the test proves nothing
    assert cross["win_rate"]["other"] == [[a, b], [a, b]]
    assert cross["win_rate"]["same"] == [[0.5, 0.5], [0.5, 0.5]]  # a model against itself ties everywhere
    assert cross["other_judges"]["other"] == [b, a]


def test_report_command_rebuilds_and_escapes(evaluated, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    res = json.loads((copy / "results.json").read_text())
    res["samples"]["redteam"][0]["responses"]["other"]["text"] = "<script>alert('x')</script> & <b>bold</b>"
    (copy / "results.json").write_text(json.dumps(res))
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    html = (copy / "report.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert "<script>" not in html
    # a run without general tasks and without any judge still renders (radar falls back to gold correctness)
    res.update(general=None, notes=["No reward model: win-rates were skipped."])
    res["conversation"].update(win_rates=[], judges={})
    (copy / "results.json").write_text(json.dumps(res))
    assert main(["report", str(copy)]) == 0
    html = (copy / "report.html").read_text()
    assert "General tasks were not run" in html and "No reward model" in html
    assert not (copy / "winrate.png").exists() and not (copy / "general_table.png").exists()  # no stale figures
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.json: not found" in err[0]
    # a results file edited by hand: one line, and no figure written without its report
    for edit, needle in [(lambda r: r.update(models={}), "'models' must name at least one model"),
                         (lambda r: r.update(schema=999), "results schema 999, newer than"),
                         (lambda r: r["model_order"].append("ghost"), "'model_order' names 'ghost'"),
                         (lambda r: r["harmlessness"]["per_model"].pop("other"), "inconsistent results file")]:
        broken = json.loads((evaluated / "results.json").read_text())
        edit(broken)
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        bad.mkdir()
        (bad / "results.json").write_text(json.dumps(broken))
        assert main(["report", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert [p.name for p in bad.iterdir()] == ["results.json"]


def _bad_run(tmp_path, capsys, models, *overrides):
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["-q", "eval", "--models", models, "--out", str(out), f"out={tmp_path / 'run'}", *WORLD, *FAST,
               *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert not (out / "results.json").exists()
    return err[0]


def test_bad_model_path_is_one_line_exit_2(tmp_path, capsys):
    msg = _bad_run(tmp_path, capsys, f"base={tmp_path / 'no-such-model'}")
    assert "model 'base'" in msg and "model folder not found" in msg


def test_reward_folder_is_not_a_causal_lm(folders, tmp_path, capsys):
    msg = _bad_run(tmp_path, capsys, f"base={folders['a']},rm={folders['rm']}")
    assert "model 'rm'" in msg and "not a causal language model" in msg


def test_malformed_prompt_file(folders, tmp_path, capsys):
    bad = tmp_path / "redteam.jsonl"
    bad.write_text('{"prompt": "\\n\\nHuman: hi\\n\\nAssistant:"}\n{"prompt": 3}\n')
    msg = _bad_run(tmp_path, capsys, f"base={folders['a']}", f"eval.redteam={bad}")
    assert "redteam.jsonl:2" in msg and "'prompt'" in msg


def test_malformed_task_file(folders, tmp_path, capsys):
    from direct_rlhf.config import load_config
    from direct_rlhf.pipeline import ensure_world

    world = ensure_world(load_config(None, [f"out={tmp_path / 'run'}", *WORLD]))  # cached: eval reuses it
    mc = world / "eval" / "mc" / "colours.jsonl"
    mc.write_text(mc.read_text() + '{"question": "Q?", "choices": ["a"], "answer": 0}\n')
    msg = _bad_run(tmp_path, capsys, f"base={folders['a']}")
    assert "colours.jsonl:5" in msg and "'choices'" in msg


def test_classifier_not_loadable_offline(folders, tmp_path, capsys):
    msg = _bad_run(tmp_path, capsys, f"base={folders['a']}", "eval.toxicity_classifier=no-such-org/tox-model")
    assert "no-such-org/tox-model" in msg and "cannot be loaded" in msg


# --- the report in a real browser --------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    script = ROOT / "scripts" / "ensure_chromium.sh"
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=600)
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        reason = (proc.stderr.strip() or "ensure_chromium.sh did not install it").splitlines()[-1]
        print(f"chromium unavailable: {reason}")
        pytest.skip(f"chromium unavailable: {reason}")
    return found


CHECK = """<script>
window.__errs = [];
window.addEventListener('error', e => window.__errs.push(String(e.message || (e.target && e.target.tagName))), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.documentElement.setAttribute('data-check', JSON.stringify({
    imgs: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    tables: document.querySelectorAll('table').length, errors: window.__errs}));
});
</script>"""


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    chromium = _chromium()
    page = tmp_path / "report_checked.html"
    html = (evaluated / "report.html").read_text()
    page.write_text(html.replace("<head>", "<head>" + CHECK, 1))
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert m, proc.stdout[:500] + proc.stderr[-2000:]
    check = json.loads(m.group(1).replace("&quot;", '"'))
    assert check["errors"] == []
    assert check["imgs"] >= 6 and check["decoded"] == check["imgs"], check
    assert check["tables"] >= 8, check
    for heading in ("General capabilities", "Harmlessness", "Conversation", "Sample transcripts"):
        assert heading in proc.stdout
    shot = tmp_path / "report.png"
    proc = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1600", (evaluated / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG", proc.stderr[-2000:]


def test_a_reward_model_without_statistics_judges_with_ones_measured_on_the_reference(folders):
    """Bring your own judge: a sequence classifier without reward_stats.json. Its mean and std are
    measured on the reference model's responses and recorded; the reference then scores mean 0."""
    tok = tiny.tokenizer()
    rm = tiny.reward_folder(tok, folders["root"] / "rm_own", seed=5)
    (rm / "reward_stats.json").unlink()
    out = folders["root"] / "eval_rm_own"
    assert main(["-q", "eval", "--models", f"base={folders['a']},other={folders['b']}", "--out", str(out),
                 f"out={folders['root'] / 'run'}", f"eval.reward_model={rm}", "eval.general=none", *WORLD, *FAST]) == 0
    res = json.loads((out / "results.json").read_text())["conversation"]
    stats = res["judges"]["reward_model"]["stats"]
    assert stats["source"].startswith("measured on ") and stats["source"].endswith("responses of 'base'")
    assert abs(res["per_model"]["base"]["mean_reward"]) < 1e-5 and stats["std"] > 0


def test_a_run_folder_the_eval_command_wrote_into_still_takes_the_other_commands(folders, tmp_path):
    """`direct-rlhf eval` writes to <out>/eval by default; every training command then checks that
    the run's stage folders are ours before any work (cli._load -> check_stage_folders). The eval
    folder once had no marker, so a `reward`, `ppo` or `sft` after `eval` refused the run folder."""
    from direct_rlhf.config import load_config
    from direct_rlhf.pipeline import check_stage_folders

    run = tmp_path / "run"
    assert main(["-q", "eval", "--models", f"base={folders['a']}", f"out={run}", *WORLD, *FAST]) == 0
    assert (run / "eval" / "results.json").is_file()
    check_stage_folders(load_config(None, [f"out={run}"]))  # raised "a folder with files direct-rlhf did not write"
