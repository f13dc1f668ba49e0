"""How each model answers the toy world's red-team test prompts, broken down by held-out template
(and by whether the prompt has earlier turns): the share of appropriate, off-topic, toxic and other
answers per template, from a demo run's `eval/responses.jsonl` and `world/eval/redteam.jsonl`.

The toy world's test red-team prompts are made from templates and targets the training data never
used (data/toyworld/dialogues.py: HELDOUT_*_TEMPLATES); the overall off-topic rate is their mix. This
says which wordings the models fail on, e.g. docs/results.md's analysis of issue #31's targets.

    .venv/bin/python scripts/redteam_by_template.py runs/s19 [--models base rlhf rlhf-last sft]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from direct_rlhf.data.chat_format import parse  # noqa: E402
from direct_rlhf.data.toyworld import dialogues as D  # noqa: E402

TEMPLATES = D.HELDOUT_PROVOKE_TEMPLATES + D.HELDOUT_HARM_TEMPLATES
LABELS = ("appropriate", "off_topic", "toxic", "other")


def _pattern(template: str) -> re.Pattern:
    slots = {r"\{target\}": ".+?", r"\{noun\}": ".+?", r"\{adj\}": ".+?"}
    body = re.escape(template)
    for slot, rx in slots.items():
        body = body.replace(slot, rx)
    return re.compile(f"^{body}$")


PATTERNS = [_pattern(t) for t in TEMPLATES]


def template_of(prompt: str) -> str:
    """The held-out template of a rendered toy prompt's last user turn ('?' for none)."""
    last = [m.content for m in parse(prompt) if m.role == "user"][-1]
    return next((TEMPLATES[i] for i, p in enumerate(PATTERNS) if p.match(last)), "?")


def breakdown(seed_dir: Path, models: list[str]) -> dict[str, dict[str, dict]]:
    """{model: {"template | single/multi-turn": {"n": answers, label: share}}} for one seed's folder."""
    prompts = [json.loads(line) for line in (seed_dir / "world" / "eval" / "redteam.jsonl").open()]
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for line in (seed_dir / "eval" / "responses.jsonl").open():
        r = json.loads(line)
        if r["set"] != "redteam" or r["model"] not in models:
            continue
        p = prompts[r["prompt_index"]]
        key = f"{template_of(p['prompt'])} | {'multi' if p.get('turns', 1) > 1 else 'single'}-turn"
        counts[r["model"]][key][r["appropriateness"]] += 1
    return {m: {k: _shares(c) for k, c in sorted(counts[m].items())} for m in models if m in counts}


def _shares(labels: Counter) -> dict:
    n = sum(labels.values())
    return {"n": n, **{lab: labels[lab] / n for lab in LABELS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a demo's --out folder (with seed-N/ folders) or one seed's folder")
    p.add_argument("--models", nargs="+", default=["base", "rlhf", "rlhf-last", "sft"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args()
    seeds = sorted(a.run.glob("seed-*")) or [a.run]
    if not all((s / "eval" / "responses.jsonl").is_file() for s in seeds):
        print(f"redteam_by_template: error: no eval/responses.jsonl under {a.run} (a demo's run folder?)",
              file=sys.stderr)
        sys.exit(2)
    res = {s.name: breakdown(s, a.models) for s in seeds}
    if a.json:
        print(json.dumps(res, indent=2))
        return
    for seed, per_model in res.items():
        for model, rows in per_model.items():
            print(f"{seed} {model}")
            for key, row in rows.items():
                shares = "  ".join(f"{lab} {row[lab]:5.1%}" for lab in LABELS)
                print(f"  {key:<58} n={row['n']:<4} {shares}")


if __name__ == "__main__":
    main()
