"""Each seed's responses judged again by the *other* seeds' reward models (`demo --seeds N`, N >= 2).

The demo's win-rate is judged by the reward model the policy was trained against, so it cannot see
reward hacking: a policy that found a hole in its own reward model looks good to that same model.
The other seeds' reward models learnt from the same pairs from another initialisation and data
order; they share the data's blind spots but not one model's quirks. A win-rate that holds up
under them was not bought by exploiting a quirk; the gap between the own judge and the others
measures how much was. Nothing is sampled again: the responses come from each seed's
`responses.jsonl`, the prompts and tie rule from its `results.json`.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..errors import UserError
from .judges import RewardJudge, outcomes_from_scores
from ..data.prompt_files import prompt_texts


@dataclass
class SeedResponses:
    """What one seed's evaluation left behind: who judged it, on what prompts, what each model said."""

    judge: str                         # that seed's reward-model folder
    tie_eps: float
    reference: str                     # the model every other one is compared with (the base)
    prompts: list[str]                 # one per response, in response order
    responses: dict[str, list[str]]    # model -> conversation responses


def read_seed(eval_dir: Path) -> SeedResponses:
    results = json.loads((eval_dir / "results.json").read_text())
    conv = results["conversation"]
    judge = conv["judges"].get("reward_model")
    if judge is None:
        raise UserError(f"{eval_dir}/results.json: no reward-model judge to compare against")
    made_in, now_in = results["config"]["out"], eval_dir.parent  # the run folder then and now
    prompts = prompt_texts(relocated(conv["prompts_file"], made_in, now_in))
    k = conv["samples_per_prompt"]
    rows: dict[str, dict[tuple[int, int], str]] = {}
    with open(eval_dir / "responses.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["set"] == "conversation":
                rows.setdefault(r["model"], {})[(r["prompt_index"], r["sample"])] = r["response"]
    keys = [(i, s) for i in range(len(prompts)) for s in range(k)]
    responses = {m: [got[key] for key in keys] for m, got in rows.items()}
    return SeedResponses(judge=relocated(judge["path"], made_in, now_in), tie_eps=judge["tie_eps"],
                         reference=conv["reference"], prompts=[prompts[i] for i, _ in keys], responses=responses)


def relocated(path: str, made_in: str, now_in: Path) -> str:
    """A path recorded while the run folder was at `made_in`, for a run folder that may since have
    moved to `now_in`: a recorded path that is gone but lay inside the run folder is looked for at
    the same place inside `now_in`; anything else stays as recorded."""
    if Path(path).exists():
        return path
    try:
        inside = Path(os.path.abspath(path)).relative_to(os.path.abspath(made_in))
    except ValueError:
        return path
    return str(now_in / inside) if (now_in / inside).exists() else path


def cross_judge(eval_dirs: Sequence[Path], batch_size: int = 32, device: str = "cpu",
                progress: bool = True) -> dict:
    """Win-rate vs the reference of every seed's models under every seed's reward model.

    Returns {"judges": [folders], "win_rate": {model: matrix}} where matrix[i][j] is seed i's model
    judged by seed j's reward model (the diagonal is each seed's own number), and
    {"other_judges": {model: [per seed: mean over the other seeds' judges]}}.
    """
    seeds = [read_seed(Path(d)) for d in eval_dirs]
    models = [m for m in seeds[0].responses if m != seeds[0].reference]
    n = len(seeds)
    matrix = {m: [[0.0] * n for _ in range(n)] for m in models}
    for j in tqdm(range(n), desc="cross-seed judges", unit="judge", disable=not progress):
        judge = RewardJudge(seeds[j].judge, batch_size=batch_size, device=device)  # one loaded at a time
        for i, run in enumerate(seeds):
            ref = judge.score(run.prompts, run.responses[run.reference])
            for m in models:
                scores = judge.score(run.prompts, run.responses[m])
                matrix[m][i][j] = float(outcomes_from_scores(scores, ref, run.tie_eps).mean())
        del judge
    others = {m: [statistics.fmean(matrix[m][i][j] for j in range(n) if j != i) for i in range(n)]
              for m in models}
    return {"judges": [s.judge for s in seeds], "win_rate": matrix, "other_judges": others}
