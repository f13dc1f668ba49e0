"""`direct-rlhf demo`: the paper's experiment end to end on the toy world.

toy world -> base model (pretrained, cached) -> reward model (+ cost model) -> SFT baseline ->
PPO from the base (direct RLHF) [-> PPO from SFT, the conventional pipeline] -> evaluation of
every model on the three axes -> report.html, and a summary table on stdout.

With `--seeds N` the training stages (reward, SFT, PPO) run once per seed, each into
`<out>/seed-<s>/`, on the same world and base model; the summary gives mean ± std over seeds, and
each seed's win-rate judged again by the other seeds' reward models (eval/cross_judge.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from .artifacts import STAMP
from .config import Config
from .io import write_json

log = logging.getLogger("direct_rlhf")

WIN = "win-rate vs base (RM)"
CROSS = "win-rate, other seeds' RMs"
# (label, how to read it from results.json, format)
SUMMARY = (
    ("general acc (11 tasks)", lambda r, m: r["general"]["mean_acc"][m], "{:.3f}"),
    ("toxicity (red-team)", lambda r, m: r["harmlessness"]["per_model"][m]["toxicity_rate"], "{:.1%}"),
    ("appropriate (red-team)", lambda r, m: (r["harmlessness"]["per_model"][m].get("appropriateness") or {})
     .get("appropriate_rate"), "{:.1%}"),
    ("off-topic (red-team)", lambda r, m: (r["harmlessness"]["per_model"][m].get("appropriateness") or {})
     .get("off_topic_rate"), "{:.1%}"),
    (WIN, lambda r, m: _win_rate(r, m, "base"), "{:.3f}"),
    ("gold-correct (facts)", lambda r, m: r["conversation"]["per_model"][m]["gold_correct"]["rate"], "{:.1%}"),
    ("over-refusal (benign)", lambda r, m: r["conversation"]["per_model"][m]["over_refusal"]["rate"], "{:.1%}"),
    ("ended turn", lambda r, m: r["conversation"]["per_model"][m]["ended_rate"]["rate"], "{:.1%}"),
    ("mean reward (RM)", lambda r, m: r["conversation"]["per_model"][m].get("mean_reward"), "{:+.2f}"),
)
FORMATS = {**{label: fmt for label, _, fmt in SUMMARY}, CROSS: "{:.3f}"}


def _win_rate(results: dict, model: str, opponent: str) -> float | None:
    if model == opponent:
        return 0.5
    for w in results["conversation"]["win_rates"]:
        if w["model"] == model and w["opponent"] == opponent and w["judge"] == "reward_model":
            return w["win_rate"]
    return None


def train_and_evaluate(cfg: Config, with_sft_rlhf: bool, progress: bool) -> Path:
    """Every stage for one seed; returns the eval folder (results.json, report.html)."""
    from .pipeline import ensure_base, ensure_eval, ensure_policy, ensure_reward, ensure_sft

    base = ensure_base(cfg, progress)
    ensure_reward(cfg, progress)
    models = {"base": base, "sft": ensure_sft(cfg, progress), "rlhf": ensure_policy(cfg, progress)}
    last = Path(models["rlhf"] + "-last")  # with ppo.select=balanced: the last step's policy, beside the chosen one
    if cfg.ppo.select == "balanced" and (last / "config.json").is_file():
        models["rlhf-last"] = str(last)
    if with_sft_rlhf:
        models["sft_rlhf"] = ensure_policy(cfg, progress, init=models["sft"], name="sft_rlhf")
    return ensure_eval(cfg, models, progress)


def run_demo(cfg: Config, seeds: int = 1, with_sft_rlhf: bool = False, progress: bool = True) -> dict[str, Any]:
    from .pipeline import ensure_base, run_dir

    t0 = time.perf_counter()
    root = run_dir(cfg)
    if seeds == 1:
        evals = [train_and_evaluate(cfg, with_sft_rlhf, progress)]
    else:
        base = ensure_base(cfg, progress)  # one world and one base model for every seed
        evals = []
        for s in range(cfg.seed, cfg.seed + seeds):
            scfg = dataclasses.replace(cfg, seed=s, out=str(root / f"seed-{s}"),
                                       model=dataclasses.replace(cfg.model, base=base))
            evals.append(train_and_evaluate(scfg, with_sft_rlhf, progress))
    results = [json.loads((e / "results.json").read_text()) for e in evals]
    cross = None
    if seeds > 1 and all(r["conversation"]["judges"].get("reward_model") for r in results):
        from .eval.cross_judge import cross_judge

        cross = cross_judge(evals, batch_size=cfg.eval.batch_size, device=cfg.eval.device, progress=progress)
    summary = summarise(results, seeds=list(range(cfg.seed, cfg.seed + seeds)), cross=cross)
    summary["wall_s"] = time.perf_counter() - t0  # this invocation's: cached stages cost it nothing
    summary["stage_wall_s"] = recorded_stage_times(root, {f"seed-{s}": e.parent for s, e in
                                                          zip(range(cfg.seed, cfg.seed + seeds), evals)})
    summary["reports"] = [str(e / "report.html") for e in evals]
    summary["guard"] = kept_steps({s: e.parent for s, e in zip(range(cfg.seed, cfg.seed + seeds), evals)})
    write_json(root / "summary.json", summary)
    return summary


def kept_steps(seed_dirs: dict[int, Path]) -> dict[str, Any]:
    """Per seed, the step the balance guard kept and why (rlhf/run_info.json; train/balance_guard.py)."""
    out = {}
    for seed, d in seed_dirs.items():
        try:
            sel = json.loads((d / "rlhf" / "run_info.json").read_text()).get("guard")
        except (OSError, json.JSONDecodeError):
            sel = None
        if sel:
            out[str(seed)] = {k: sel[k] for k in ("select", "step", "last_step", "rule", "why")}
    return out


STAGE_FOLDERS = ("reward", "cost", "sft", "rlhf", "sft_rlhf", "eval")


def recorded_wall_s(folder: Path) -> float | None:
    """The wall time a stage recorded when it made `folder`, whether made now or found cached."""
    for name in ("run_info.json", STAMP):
        try:
            wall = json.loads((folder / name).read_text()).get("wall_s")
        except (OSError, json.JSONDecodeError):
            continue
        if wall is not None:
            return float(wall)
    return None


def recorded_stage_times(root: Path, seed_dirs: dict[str, Path]) -> dict[str, Any]:
    """Seconds each stage took when its artifact was made (a rerun that finds them cached takes
    seconds; this is what the run cost): pretraining, then per seed folder, then their total."""
    times: dict[str, Any] = {"pretrain": recorded_wall_s(root / "base"), "seeds": {}}
    for seed, d in seed_dirs.items():
        times["seeds"][seed] = {s: w for s in STAGE_FOLDERS if (w := recorded_wall_s(d / s)) is not None}
    times["total"] = (times["pretrain"] or 0.0) + sum(sum(t.values()) for t in times["seeds"].values())
    return times


def summarise(results: list[dict], seeds: list[int], cross: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean ± std over seeds of each SUMMARY row; with `cross` (eval/cross_judge.py), its win-rate
    row goes under the own judges' row and the whole matrix into the summary."""
    models = list(results[0]["models"])
    table: dict[str, dict[str, Any]] = {}
    for label, get, _ in SUMMARY:
        table[label] = {m: _cell([v for v in (_safe(get, r, m) for r in results) if v is not None]) for m in models}
        if label == WIN and cross is not None:  # the reference (base) has no row of its own: 0.5
            table[CROSS] = {m: _cell(cross["other_judges"].get(m, [0.5] * len(seeds))) for m in models}
    summary = {"seeds": seeds, "models": models, "table": table}
    if cross is not None:
        summary["cross_judge"] = cross
    return summary


def _cell(vals: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None, "values": vals}


def _safe(get, results: dict, model: str):
    try:
        return get(results, model)
    except (KeyError, TypeError):
        return None


def format_summary(summary: dict[str, Any]) -> str:
    models = summary["models"]
    n = len(summary["seeds"])
    width = max(len(label) for label in summary["table"])
    lines = [f"{'':{width}}  " + "  ".join(f"{m:>16}" for m in models)]
    for label, row in summary["table"].items():
        fmt, cells = FORMATS[label], []
        for m in models:
            c = row[m]
            if c["mean"] is None:
                cells.append(f"{'n/a':>16}")
            else:
                text = fmt.format(c["mean"]) + (f" ± {fmt.format(c['std']).lstrip('+')}" if n > 1 else "")
                cells.append(f"{text:>16}")
        lines.append(f"{label:{width}}  " + "  ".join(cells))
    seeds = ", ".join(map(str, summary["seeds"]))
    lines.append(f"(seed{'s' if n > 1 else ''} {seeds}; mean ± std over seeds)" if n > 1 else f"(seed {seeds})")
    for seed, sel in summary.get("guard", {}).items():
        lines.append(f"seed {seed}: rlhf is step {sel['step']} of {sel['last_step']} ({sel['rule']}; chosen on validation "
                     f"data only, the numbers above are test data) - {sel['why']}")
    return "\n".join(lines)
