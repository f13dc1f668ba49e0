"""The report's figures, drawn from results.json alone (so `direct-rlhf report` can redraw them).

Figures are built with `matplotlib.figure.Figure` and its Agg canvas directly, never pyplot:
no global figure registry, no backend switching, nothing that leaks between calls or threads.
Each function returns PNG bytes, or None when the results hold nothing to draw.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.figure import Figure

COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def model_names(results: dict[str, Any]) -> list[str]:
    """Models in the order the user named them (JSON objects are written with sorted keys)."""
    return list(results.get("model_order") or results["models"])


def general_table(results: dict[str, Any]) -> bytes | None:
    gen = results.get("general")
    if not gen:
        return None
    models = [m for m in model_names(results) if m in gen["per_model"]]
    tasks = gen["tasks"]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    rows = [[cell(gen["per_model"][m][t]["acc"]) for m in models] for t in tasks]
    rows.append([cell(gen["mean_acc"][m]) for m in models])
    labels = [t.removeprefix("toy_") for t in tasks] + ["mean"]
    fig = Figure(figsize=(1.6 + 1.3 * len(models), 0.32 * (len(labels) + 2)))
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(cellText=rows, rowLabels=labels, colLabels=models, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.25)
    for (r, _c), c in table.get_celld().items():
        if r == len(labels):  # the mean row
            c.set_text_props(fontweight="bold")
    ax.set_title(f"General tasks: accuracy (%) by lm-eval ({gen['preset']})", fontsize=10)
    return _png(fig)


def radar_axes(results: dict[str, Any]) -> tuple[list[str], dict[str, list[float]]]:
    """The three axes (general acc, 1 - toxicity, win-rate vs base) where they exist; the gold
    judge stands in for the win-rate when no reward model judged."""
    models = model_names(results)
    base = results["reference"]["base"]
    axes: list[str] = []
    values: dict[str, list[float]] = {m: [] for m in models}
    gen = results.get("general")
    if gen and all(gen["mean_acc"].get(m) is not None for m in models):
        axes.append("general acc")
        for m in models:
            values[m].append(gen["mean_acc"][m])
    harm = results["harmlessness"]["per_model"]
    axes.append("1 - toxicity")
    for m in models:
        values[m].append(1.0 - harm[m]["toxicity_rate"])
    wins = {w["model"]: w["win_rate"] for w in results["conversation"]["win_rates"]
            if w["opponent"] == base and w["judge"] == "reward_model"}
    if wins or (len(models) == 1 and "reward_model" in results["conversation"]["judges"]):
        axes.append(f"win-rate vs {base}")
        for m in models:
            values[m].append(0.5 if m == base else wins[m])
    else:
        axes.append("gold correct")
        for m in models:
            values[m].append(results["conversation"]["per_model"][m]["gold_correct"]["rate"] or 0.0)
    return axes, values


def radar(results: dict[str, Any]) -> bytes:
    axes, values = radar_axes(results)
    n = len(axes)
    angles = [2 * math.pi * i / n for i in range(n)] + [0.0]
    fig = Figure(figsize=(4.8, 4.8))
    ax = fig.add_subplot(projection="polar")
    for i, (m, vals) in enumerate(values.items()):
        ax.plot(angles, vals + vals[:1], color=_colour(i), linewidth=2, label=m)
        ax.fill(angles, vals + vals[:1], color=_colour(i), alpha=0.12)
    ax.set_xticks(angles[:-1])
    ax.set_xticklabels(axes, fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.12), fontsize=8)
    ax.set_title("The three axes (outer is better)", fontsize=10, pad=18)
    return _png(fig)


def badword_layers(results: dict[str, Any]) -> bytes:
    fig = Figure(figsize=(5.6, 3.6))
    ax = fig.add_subplot()
    for i, m in enumerate(model_names(results)):
        ys = results["harmlessness"]["per_model"][m]["badword_probe"]["by_layer"]
        ax.plot(range(len(ys)), ys, marker="o", color=_colour(i), label=m)
    ax.set_xlabel("layer (0 = embeddings; last = the model's output)")
    ax.set_ylabel("P(next token is a bad word)")
    ax.set_title("Logit lens on red-team prompts", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _bars(ax: Any, labels: list[str], vals: list[float], cis: list[list[float]], colours: list[str]) -> None:
    lo = [max(0.0, v - c[0]) for v, c in zip(vals, cis)]
    hi = [max(0.0, c[1] - v) for v, c in zip(vals, cis)]
    ax.bar(range(len(vals)), vals, yerr=[lo, hi], capsize=5, color=colours)
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(labels, fontsize=8, rotation=15 if len(labels) > 4 else 0)
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.2f}", (i, v), textcoords="offset points", xytext=(8, 3), fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def toxicity_bars(results: dict[str, Any]) -> bytes:
    harm = results["harmlessness"]
    models = model_names(results)
    fig = Figure(figsize=(1.8 + 1.1 * len(models), 3.4))
    ax = fig.add_subplot()
    _bars(ax, models, [harm["per_model"][m]["toxicity_rate"] for m in models],
          [harm["per_model"][m]["toxicity_rate_ci95"] for m in models], [_colour(i) for i in range(len(models))])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"toxic responses (P >= {harm['threshold']})")
    ax.set_title(f"Toxicity on red-team prompts ({harm['classifier']}), 95% Wilson", fontsize=9)
    return _png(fig)


def winrate_bars(results: dict[str, Any]) -> bytes | None:
    wins = results["conversation"]["win_rates"]
    if not wins:
        return None
    models = model_names(results)
    labels = [f"{w['model']} vs {w['opponent']}" + (" (LLM)" if w["judge"] == "http" else "") for w in wins]
    fig = Figure(figsize=(1.8 + 1.3 * len(wins), 3.4))
    ax = fig.add_subplot()
    _bars(ax, labels, [w["win_rate"] for w in wins], [w["ci95"] for w in wins],
          [_colour(models.index(w["model"])) for w in wins])
    ax.axhline(0.5, color="black", linewidth=1, linestyle="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win-rate (ties count 0.5)")
    ax.set_title("Conversation win-rate, 95% bootstrap over prompts", fontsize=9)
    return _png(fig)


GUARD_AXES = (("general_acc", "general accuracy (validation)"), ("toxicity", "toxicity (validation red-team)"),
              ("appropriate", "appropriate (validation red-team)"), ("win_rate", "win-rate vs start (validation)"))


def guard_trajectory(results: dict[str, Any]) -> bytes | None:
    """The balance guard's evaluations (train/balance_guard.py) of each guarded model: the three axes
    against the PPO step (harmlessness in two panels: toxicity and appropriate answers), the start
    policy at step 0, the bounds dashed, the kept step marked."""
    guarded = results.get("guard") or {}
    if not guarded:
        return None
    fig = Figure(figsize=(13, 2.6 * len(guarded)))
    axes = fig.subplots(len(guarded), len(GUARD_AXES), squeeze=False)
    for row, (name, sel) in zip(axes, guarded.items()):
        ref, records = sel["reference"], sel["evaluations"]
        steps = [0] + [r["step"] for r in records]
        bounds = sel.get("bounds", {})
        for ax, (key, label) in zip(row, GUARD_AXES):
            vals = [ref.get(key)] + [r.get(key) for r in records]
            pts = [(s, v) for s, v in zip(steps, vals) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=_colour(1))
            if key == "general_acc" and ref.get(key) is not None:
                ax.axhline(ref[key] - bounds.get("max_capability_drop_points", 0) / 100, color="grey", linestyle="--")
            if key == "toxicity" and ref.get(key) is not None:
                ax.axhline(ref[key] * bounds.get("max_toxicity_ratio", 1), color="grey", linestyle="--")
            if key == "appropriate" and bounds.get("min_appropriate"):
                ax.axhline(bounds["min_appropriate"], color="grey", linestyle="--")
            ax.axvline(sel["step"], color="black", linewidth=1)
            ax.set_title(f"{name}: {label}", fontsize=8)
            ax.set_xlabel("PPO step", fontsize=8)
    fig.suptitle("Balance guard: validation data only (kept step: black line; bounds: dashed)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


FIGURES = {
    "general_table.png": general_table,
    "radar.png": radar,
    "badword_by_layer.png": badword_layers,
    "toxicity.png": toxicity_bars,
    "winrate.png": winrate_bars,
    "guard_trajectory.png": guard_trajectory,
}


def make_figures(results: dict[str, Any]) -> dict[str, bytes]:
    """{file name: PNG bytes} for every figure the results can support."""
    out = {}
    for name, draw in FIGURES.items():
        png = draw(results)
        if png is not None:
            out[name] = png
    return out
