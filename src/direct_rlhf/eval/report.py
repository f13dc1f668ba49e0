"""report.html: the evidence on one page, self-contained (inline CSS, PNGs as data URIs).

Built from results.json alone, so `direct-rlhf report RESULTS_DIR` can rebuild it (after editing
a figure, say) without re-running any model. Every string that came from a model or a file goes
through `html.escape`: model output is untrusted text, and a response containing "<script>" must
show as text, not run.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..io import atomic_file
from .plots import FIGURES, make_figures, model_names

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
     padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
h3{margin-top:1.4rem} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:right;vertical-align:top}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.ci{color:#777;font-size:.8rem} .figs{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.figs img{max-width:100%;border:1px solid #eee}
table.tx td{text-align:left;width:1%;min-width:12rem} table.tx td pre,pre.p{white-space:pre-wrap;margin:0;
     font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.82rem}
pre.p{background:#f8f8f8;padding:.4rem;border-left:3px solid #bbb}
.meta{color:#555;font-size:.8rem} .note{background:#fff8e1;border-left:4px solid #f5b800;padding:.4rem .7rem}
.bad{color:#b00020} .ok{color:#1b7f3b}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(v: float | None) -> str:
    return "&ndash;" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return "&ndash;" if v is None else fmt.format(v)


def _ci(ci: list[float] | None, pct: bool = True) -> str:
    if not ci or any(c is None or c != c for c in ci):
        return ""
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f' <span class="ci">[{f(ci[0])}, {f(ci[1])}]</span>'


def _table(head: list[str], rows: Iterable[list[str]], cls: str = "", left_cols: int = 1) -> str:
    """`head` is escaped here; cells are already-safe HTML."""
    th = "".join(f'<th class="l">{_e(h)}</th>' if i < left_cols else f"<th>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left_cols else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" title="{_e(name)}">'


def _win(results: dict[str, Any], model: str, opponent: str | None, judge: str = "reward_model") -> dict | None:
    for w in results["conversation"]["win_rates"]:
        if w["model"] == model and w["opponent"] == opponent and w["judge"] == judge:
            return w
    return None


def _summary(results: dict[str, Any]) -> str:
    models, base = model_names(results), results["reference"]["base"]
    gen, harm, conv = results.get("general"), results["harmlessness"]["per_model"], results["conversation"]["per_model"]
    rows = []
    for m in models:
        w = _win(results, m, base)
        win = ("0.500 (reference)" if m == base and results["conversation"]["judges"].get("reward_model")
               else (_num(w["win_rate"]) + _ci(w["ci95"], pct=False)) if w else "&ndash;")
        c = conv[m]
        rows.append([_e(m), _pct(gen["mean_acc"][m]) if gen else "&ndash;",
                     _pct(harm[m]["toxicity_rate"]) + _ci(harm[m]["toxicity_rate_ci95"]), win,
                     _pct(c["gold_correct"]["rate"]) + _ci(c["gold_correct"]["ci95"]),
                     _pct(c["over_refusal"]["rate"]), _pct(c["ended_rate"]["rate"])])
    return _table(["model", "general acc (mean)", "toxicity rate", f"win-rate vs {base}", "gold correct",
                   "over-refusal", "ended turn"], rows)


def _general(results: dict[str, Any], images: dict[str, bytes]) -> str:
    gen = results.get("general")
    if not gen:
        return "<p>General tasks were not run (eval.general=none).</p>"
    models = [m for m in model_names(results) if m in gen["per_model"]]
    rows = []
    for t in gen["tasks"]:
        cells = [_e(t)]
        for m in models:
            r = gen["per_model"][m][t]
            se = f' <span class="ci">&plusmn;{100 * r["acc_stderr"]:.1f}</span>' if r.get("acc_stderr") is not None else ""
            cells.append(_pct(r["acc"]) + se)
        cells.append(str(gen["per_model"][models[0]][t].get("n", "")))
        rows.append(cells)
    rows.append(["<b>mean</b>"] + [f"<b>{_pct(gen['mean_acc'][m])}</b>" for m in models] + [""])
    return (f"<p>Accuracy (<code>acc</code>, &plusmn; lm-eval's standard error) computed in-process by "
            f"lm-evaluation-harness, preset <code>{_e(gen['preset'])}</code>.</p>"
            + _table(["task"] + models + ["n"], rows)
            + f'<div class="figs">{_img(images, "general_table.png", "general task accuracy table")}</div>')


def _appropriateness_note(judged: dict[str, Any] | None) -> str:
    if not judged:
        return "<p class='meta'>Appropriateness was not judged for these results (see the notes).</p>"
    how = (f"judged by the reward model against the reference refusal &ldquo;{_e(judged['reference_refusal'])}&rdquo;"
           f" (off-topic is not told apart there: it counts as other)" if "reference_refusal" in judged
           else "judged exactly by the toy world's reply styles")
    return (f"<p><b>Appropriate</b>: the answer declines or de-escalates and stays on the user's topic; "
            f"<b>off-topic</b>: an unrelated fact, small talk or non sequitur (evasion); {how} "
            f"(docs/evaluation.md).</p>")


def _harmlessness(results: dict[str, Any], images: dict[str, bytes]) -> str:
    h = results["harmlessness"]
    models = model_names(results)
    rows = []
    for m in models:
        r = h["per_model"][m]
        a = r.get("appropriateness") or {}
        rows.append([_e(m), _pct(r["toxicity_rate"]) + _ci(r["toxicity_rate_ci95"]),
                     _pct(a.get("appropriate_rate")) + (_ci(a["appropriate_rate_ci95"]) if a else ""),
                     _pct(a.get("off_topic_rate")) + (_ci(a["off_topic_rate_ci95"]) if a else ""),
                     _num(r["mean_score"]) + _ci(r["mean_score_ci95"], pct=False), str(r["n"]),
                     _num(max(r["badword_probe"]["by_layer"]), "{:.4f}"),
                     _num(r["badword_probe"]["by_layer"][-1], "{:.4f}")])
    probe_rows = []
    n_layers = max(len(h["per_model"][m]["badword_probe"]["by_layer"]) for m in models)
    for layer in range(n_layers):
        probe_rows.append([str(layer)] + [_num(p[layer], "{:.4f}") if layer < len(p) else "&ndash;"
                                          for p in (h["per_model"][m]["badword_probe"]["by_layer"] for m in models)])
    missing = sorted({w for m in models for w in h["per_model"][m]["badword_probe"]["words_without_single_token"]})
    miss = (f"<p class='meta'>Words with no single-token form for some model (not counted): {_e(', '.join(missing))}</p>"
            if missing else "")
    return (f"<p>{h['samples_per_prompt']} samples per red-team prompt ({h['n_prompts']} prompts, temperature "
            f"{h['temperature']}, top-p {h['top_p']}, at most {h['max_new_tokens']} new tokens), scored by the "
            f"independent classifier <code>{_e(h['classifier'])}</code>; a response is toxic when P(toxic) &ge; "
            f"{h['threshold']}. Intervals: Wilson for the rates, percentile bootstrap over prompts for the mean.</p>"
            + _appropriateness_note(h.get("appropriateness"))
            + _table(["model", "toxicity rate", "appropriate", "off-topic", "mean P(toxic)", "responses",
                      "bad-word P (max layer)",
                      "bad-word P (output)"], rows)
            + f'<div class="figs">{_img(images, "toxicity.png", "toxicity rate by model")}'
            f'{_img(images, "badword_by_layer.png", "bad-word probability by layer")}</div>'
            "<h3>Bad-word probability by layer (logit lens)</h3>"
            f"<p>Each layer's residual stream at the last prompt position through the final norm and LM head; "
            f"probability summed over {len(h['badwords']['words'])} bad words "
            f"(<code>{_e(Path(h['badwords']['file']).name)}</code>), mean over red-team prompts.</p>"
            + _table(["layer"] + models, probe_rows) + miss)


def _conversation(results: dict[str, Any], images: dict[str, bytes]) -> str:
    c = results["conversation"]
    models = model_names(results)
    rows = []
    for m in models:
        r = c["per_model"][m]
        reward = _num(r.get("mean_reward")) + _ci(r.get("mean_reward_ci95"), pct=False)
        rows.append([_e(m), reward, _pct(r["gold_correct"]["rate"]) + _ci(r["gold_correct"]["ci95"]),
                     _pct(r["over_refusal"]["rate"]) + _ci(r["over_refusal"]["ci95"]),
                     _pct(r["ended_rate"]["rate"]), _num(r["mean_length_tokens"], "{:.1f}"),
                     _num(r["distinct_2"]), _pct(r.get("toxicity_rate"))])
    win_rows = [[_e(w["model"]), _e(w["opponent"]), _e(w["judge"]), _num(w["win_rate"]) + _ci(w["ci95"], pct=False),
                 str(w["wins"]), str(w["ties"]), str(w["losses"])] for w in c["win_rates"]]
    judges = c["judges"]
    judge_txt = (f"<p>Reward-model judge: <code>{_e(judges['reward_model']['path'])}</code>; "
                 f"{_e(judges['reward_model']['rule'])}.</p>" if "reward_model" in judges
                 else '<p class="note">No reward model: win-rates by the reward model were skipped.</p>')
    if "http" in judges:
        judge_txt += (f"<p>LLM judge: <code>{_e(judges['http']['model'])}</code> at <code>{_e(judges['http']['url'])}"
                      f"</code>, asked in both orders; unparsed verdicts (counted as ties): "
                      f"{judges['http']['unparsed_verdicts']}.</p>")
    wins = (_table(["model", "opponent", "judge", "win-rate [95% CI]", "wins", "ties", "losses"], win_rows, left_cols=3)
            if win_rows else "")
    return (f"<p>{c['samples_per_prompt']} sample(s) per held-out conversation prompt ({c['n_prompts']} prompts). "
            f"Gold correct: the response states the known answer (whole word, any case), on prompts that have one. "
            f"Over-refusal: benign prompts answered with a refusal or a deflection (a phrase count).</p>"
            + judge_txt + wins
            + f'<div class="figs">{_img(images, "winrate.png", "win-rate bars")}'
            f'{_img(images, "radar.png", "radar chart of the three axes")}</div>'
            + _table(["model", "mean reward", "gold correct", "over-refusal", "ended turn", "mean length (tokens)",
                      "distinct-2", "toxic"], rows))


def _transcripts(results: dict[str, Any]) -> str:
    parts = []
    titles = {"redteam": "Red-team prompts", "conversation": "Conversation prompts"}
    for key, rows in results.get("samples", {}).items():
        if not rows:
            continue
        models = [m for m in model_names(results) if m in rows[0]["responses"]]
        parts.append(f"<h3>{_e(titles.get(key, key))}</h3>")
        for i, row in enumerate(rows):
            meta = f"kind: {_e(row.get('kind'))}" + (f" &middot; gold: {_e(row['gold'])}" if row.get("gold") else "")
            cells = []
            for m in models:
                r = row["responses"][m]
                tags = [f"P(toxic) {r['toxicity']:.2f}"] + ([f"reward {r['reward']:.2f}"] if "reward" in r else [])
                tags.append("ended" if r["ended"] else '<span class="bad">not ended</span>')
                cells.append(f"<pre>{_e(r['text'].strip()) or '<i>(empty)</i>'}</pre>"
                             f"<div class='meta'>{' &middot; '.join(tags)}</div>")
            parts.append(f'<p class="meta">#{i + 1} &middot; {meta}</p>'
                         f'<pre class="p">{_e(row["prompt"].strip())}</pre>'
                         + _table(models, [cells], cls="tx", left_cols=len(models)))
    return "".join(parts) or "<p>No sample transcripts.</p>"


def guard_selections(results: dict[str, Any]) -> dict[str, Any]:
    """{model: the balance guard's record} for each model folder whose run_info.json has one
    (a PPO policy saved with ppo.eval_every > 0; train/balance_guard.py)."""
    out = {}
    for name, src in results.get("models", {}).items():
        try:
            sel = json.loads((Path(src) / "run_info.json").read_text()).get("guard")
        except (OSError, ValueError, AttributeError):
            continue
        if sel:
            out[name] = sel
    return out


def _guard(results: dict[str, Any], images: dict[str, bytes]) -> str:
    guarded = results.get("guard") or {}
    if not guarded:
        return ""
    lines = "".join(f"<li><b>{_e(n)}</b>: kept step {_e(s['step'])} of {_e(s['last_step'])} "
                    f"({_e(s['rule'])}): {_e(s['why'])}</li>" for n, s in guarded.items())
    return (f'<h2 id="guard">Balance guard</h2><ul>{lines}</ul><p class="note">The step was chosen on '
            f"validation data only (sets drawn apart from the test sets); every other number in this report "
            f"comes from test data only.</p>"
            f'<div class="figs">{_img(images, "guard_trajectory.png", "validation axes against PPO step")}</div>')


def render_html(results: dict[str, Any], images: dict[str, bytes]) -> str:
    models = model_names(results)
    model_rows = [[_e(n), f"<code>{_e(results['models'][n])}</code>"] for n in models]
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in results.get("notes", []))
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in results.get("versions", {}).items())
    config = _e(json.dumps(results.get("config", {}), indent=2, sort_keys=True))
    total = results.get("timing_s", {}).get("total")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>direct-rlhf evaluation report</title><style>{CSS}</style></head>
<body>
<h1>direct-rlhf evaluation report</h1>
<p class="sub">General capabilities kept? Toxic output down? Conversation better? &mdash; {len(models)} model(s),
reference <b>{_e(results['reference']['base'])}</b>{', SFT <b>' + _e(results['reference']['sft']) + '</b>'
        if results['reference'].get('sft') else ''}.</p>
{_table(["model", "source"], model_rows, left_cols=2)}
{notes}
<h2 id="summary">Summary</h2>
{_summary(results)}
<div class="figs">{_img(images, "radar.png", "radar chart of the three axes")}</div>
<h2 id="general">General capabilities</h2>
{_general(results, images)}
<h2 id="harmlessness">Harmlessness</h2>
{_harmlessness(results, images)}
<h2 id="conversation">Conversation</h2>
{_conversation(results, images)}
{_guard(results, images)}
<h2 id="transcripts">Sample transcripts (side by side)</h2>
{_transcripts(results)}
<h2 id="run">Run</h2>
<p class="meta">Seed {_e(results.get('seeds', {}).get('seed'))}; {_e(results.get('seeds', {}).get('rule', ''))}.
{f'Total time {total:.0f} s. ' if isinstance(total, (int, float)) else ''}Versions: {versions}.</p>
<details><summary>Configuration</summary><pre class="p">{config}</pre></details>
</body></html>
"""


def write_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the PNG figures and report.html into out_dir (each file atomically); return the HTML path."""
    out_dir = Path(out_dir)
    results = {**results, "guard": guard_selections(results)}  # for the figure and the report only
    images = make_figures(results)
    html = render_html(results, images)  # everything drawn before the first file is written
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, png in images.items():
        with atomic_file(out_dir / name) as tmp:
            Path(tmp).write_bytes(png)
    for name in set(FIGURES) - set(images):  # a figure this run cannot draw must not show an older run's
        (out_dir / name).unlink(missing_ok=True)
    path = out_dir / "report.html"
    with atomic_file(path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    return path


def report_from_dir(results_dir: str | Path) -> Path:
    """`direct-rlhf report DIR`: rebuild figures and report.html from DIR/results.json."""
    path = Path(results_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (run 'direct-rlhf eval' first, or give its --out folder)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in ("models", "reference", "harmlessness", "conversation") if k not in results]
    if missing:
        raise UserError(f"{path}: not a direct-rlhf results file (missing '{missing[0]}')")
    from .runner import RESULTS_SCHEMA

    schema = results.get("schema", 1)
    if not isinstance(schema, int) or schema > RESULTS_SCHEMA:
        raise UserError(f"{path}: results schema {schema!r}, newer than this direct-rlhf reads "
                        f"({RESULTS_SCHEMA}); upgrade direct-rlhf")
    models = results["models"]
    if not isinstance(models, dict) or not models:
        raise UserError(f"{path}: 'models' must name at least one model")
    unknown = [m for m in results.get("model_order", []) if m not in models]
    if unknown:
        raise UserError(f"{path}: 'model_order' names '{unknown[0]}', which is not in 'models'")
    try:
        return write_report(results, results_dir)
    except (KeyError, TypeError, ValueError, IndexError) as err:  # a results file edited by hand
        raise UserError(f"{path}: inconsistent results file ({type(err).__name__}: {err})") from None
