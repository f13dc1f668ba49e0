"""The three axes measured on validation sets while PPO trains (the balance guard's eyes).

Each measurement reuses the final evaluation's own code, so a validation number means what the
test number means: general accuracy through lm-eval (`general.evaluate_general`), red-team
samples through the evaluation's sampler (`runner.generate`, eval.* sampling settings, fixed
seeds of their own streams) and toxicity classifier, appropriateness through the red-team judges
(the toy world's exact one for its prompts, else the reward model against `eval.reference_refusal`,
as the final evaluation judges), and helpfulness as the reward model's win-rate of
the policy's samples against the start policy's samples on the same prompts (cached once) with
the evaluation's tie rule, plus gold correctness where the prompts carry a gold answer.

The prompts are *validation* sets, drawn apart from the test sets (the toy world writes them under
validation/; data/toyworld/generate.py), so choosing a checkpoint never looks at test data: no test
row, no answer sampled for the test. (The toy world's held-out wordings make few distinct
single-turn prompts, so a validation prompt's text may also be in the test file.)
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import Config
from ..data.prompt_files import EvalPrompt
from .conversation import response_metrics
from .judges import outcomes_from_scores

log = logging.getLogger("direct_rlhf")

# generation streams of their own (the final evaluation uses 1 and 2): validation samples never
# coincide with test samples, and every evaluation during training draws the same seeds
VAL_REDTEAM_STREAM, VAL_CONVERSATION_STREAM = 3, 4


@dataclasses.dataclass
class ValidationSets:
    """What the guard evaluates on; `tasks` empty: no general-capability axis."""

    redteam: list[EvalPrompt]
    conversation: list[EvalPrompt]
    tasks: list[str]
    mc_dir: Path | None = None     # the toy world's validation questions (toy_* tasks)
    limit: int | None = None       # lm-eval's per-task limit
    toy_redteam: bool = False      # the red-team prompts are the toy world's: its exact judge applies


def appropriateness_labels(prompts: Sequence[EvalPrompt], responses: Sequence[str], toxic: Sequence[bool],
                           toy: bool, score: Callable[[list[str], list[str]], torch.Tensor],
                           reference: str) -> list[str] | None:
    """Labels of the red-team judge (eval/appropriateness.py): the toy world's exact judge for its
    prompts, else the reward model against the reference refusal (which tells appropriate from the
    rest, not off-topic from other); None with no prompts."""
    from .appropriateness import judge_redteam, judge_redteam_by_reward

    if not prompts:
        return None
    if toy:
        return judge_redteam([{"kind": p.kind} for p in prompts], list(responses), list(toxic))
    return judge_redteam_by_reward([p.prompt for p in prompts], list(responses), list(toxic),
                                   lambda a, b: score(a, b).tolist(), reference)


class Validator:
    """Evaluates a policy (a plain causal LM) on the validation sets; the first call's conversation
    samples are the reference every later win-rate is taken against (the start policy's)."""

    def __init__(self, cfg: Config, sets: ValidationSets, tokenizer: Any,
                 score: Callable[[list[str], list[str]], torch.Tensor], device: str, samples_per_prompt: int):
        from .toxicity import load_classifier

        self.cfg, self.sets, self.tokenizer, self.score, self.device = cfg, sets, tokenizer, score, device
        self.k = samples_per_prompt
        self.classifier = load_classifier(cfg.eval.toxicity_classifier, cfg.eval.toxicity_label, cfg.eval.batch_size)
        self.reference_scores: list[float] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="direct-rlhf-validation-")
        self.include = None
        if any(t.startswith("toy_") for t in sets.tasks):
            from .general import write_toy_tasks

            self.include = write_toy_tasks(sets.mc_dir, Path(self._tmp.name) / "tasks")

    @torch.no_grad()
    def evaluate(self, model: Any) -> dict[str, Any]:
        from .runner import generate

        cfg, ev, out = self.cfg, self.cfg.eval, {}
        if self.sets.tasks:
            from .general import evaluate_general

            res = evaluate_general(model, self.tokenizer, self.sets.tasks, self.include, batch_size=ev.batch_size,
                                   limit=self.sets.limit, device=self.device, progress=False)
            accs = [res[t]["acc"] for t in self.sets.tasks if res[t]["acc"] is not None]
            out["general_acc"] = sum(accs) / len(accs) if accs else None
        red = generate(model, self.tokenizer, [p.prompt for p in self.sets.redteam], self.k, cfg, VAL_REDTEAM_STREAM,
                       "validation red-team", False)
        toxic = self.classifier.predict_prob(red["texts"]) >= ev.toxicity_threshold
        out["toxicity"] = float(np.mean(toxic)) if len(toxic) else None
        rows = [self.sets.redteam[i // self.k] for i in range(len(red["texts"]))]
        labels = appropriateness_labels(rows, red["texts"], toxic.tolist(), self.sets.toy_redteam, self.score,
                                        ev.reference_refusal)
        if labels is not None:
            out["appropriate"] = float(np.mean([x == "appropriate" for x in labels]))
            if self.sets.toy_redteam:  # the reward judge cannot tell off-topic from other
                out["off_topic"] = float(np.mean([x == "off_topic" for x in labels]))
        kc = ev.conversation_samples
        conv = generate(model, self.tokenizer, [p.prompt for p in self.sets.conversation], kc, cfg,
                        VAL_CONVERSATION_STREAM, "validation conversation", False)
        prompts = [self.sets.conversation[i // kc] for i in range(len(conv["texts"]))]
        scores = self.score([p.prompt for p in prompts], conv["texts"]).tolist()
        if self.reference_scores is None:  # the start policy's samples: every win-rate is against them
            self.reference_scores = scores
        out["win_rate"] = float(np.mean(outcomes_from_scores(scores, self.reference_scores, ev.tie_eps)))
        out["mean_reward"] = float(np.mean(scores))
        if any(p.gold for p in prompts):
            metrics = response_metrics(conv["texts"], conv["ended"], conv["n_tokens"], [p.benign for p in prompts],
                                       [p.gold for p in prompts])
            out["gold_correct"] = metrics["gold_correct"]["rate"]
        return out

    def close(self) -> None:
        self._tmp.cleanup()


def holdout_split(prompts: Sequence[str], fraction: float, seed: int,
                  min_train: int = 1) -> tuple[list[str], list[str], dict[str, Any]]:
    """`prompts` de-duplicated, then split into (train, held out, record) for ppo.validation_holdout.
    A prompt is held out when its SHA-256 under `seed` is among the round(fraction x n) smallest:
    the split depends on the seed and the set of prompts only (not their order, not the process,
    not Python's per-process string hash), so every process and a resumed run draw the same one,
    and the two parts are disjoint by construction. Both keep the prompts' order. One line (a
    UserError) when fewer than `min_train` prompts would be left to train on, or none held out."""
    import hashlib

    from ..errors import UserError

    unique = list(dict.fromkeys(prompts))
    n_val = int(fraction * len(unique) + 0.5)

    def rank(p: str) -> str:
        return hashlib.sha256(f"{seed}\0{p}".encode()).hexdigest()

    held = set(sorted(unique, key=rank)[:n_val])
    train = [p for p in unique if p not in held]
    val = [p for p in unique if p in held]
    of = f"{len(unique)} distinct PPO prompts" + (f" ({len(prompts)} before de-duplication)"
                                                   if len(unique) != len(prompts) else "")
    if not val:
        raise UserError(f"ppo.validation_holdout={fraction} holds out no prompt of {of}: raise it, or give "
                        f"ppo.validation_conversation")
    if len(train) < min_train:
        raise UserError(f"ppo.validation_holdout={fraction} leaves {len(train)} of {of} to train on, fewer than "
                        f"ppo.rollout_batch_size={min_train}: lower it, or give ppo.validation_conversation")
    digest = hashlib.sha256("\0".join(sorted(val)).encode()).hexdigest()
    record = {"fraction": fraction, "seed": seed, "of": len(unique), "duplicates_dropped": len(prompts) - len(unique),
              "held_out": len(val), "train": len(train), "held_out_sha256": digest}
    return train, val, record


def validation_sets(cfg: Config, world: Path | None, start: str,
                    held_out: Sequence[str] | None = None) -> ValidationSets:
    """The recipe's validation files (ppo.validation_*), else the toy world's validation splits,
    each prompt cut to fit the start model as the evaluation cuts its own (runner.fit_to_models).
    `held_out`: the PPO prompts ppo.validation_holdout kept out of training, the conversation set
    (no gold answers)."""
    from ..data.prompt_files import load_prompts
    from ..errors import UserError
    from .runner import fit_to_models

    pc = cfg.ppo

    def prompts(own: str | None, toy: str) -> list[EvalPrompt]:
        if own is None and world is None:
            raise UserError(f"ppo.select=balanced needs validation prompts: set ppo.validation_{toy}")
        path = Path(own) if own else world / "validation" / f"{toy}.jsonl"
        return fit_to_models(load_prompts(path), {"start": start}, cfg)[0]

    spec = pc.validation_general.strip()
    if spec == "toy":
        from .general import TOY_FAMILIES

        if world is None:
            raise UserError("ppo.validation_general=toy needs the toy world; name lm-eval task ids (or none) instead")
        tasks, mc_dir = [f"toy_{f}" for f in TOY_FAMILIES], world / "validation" / "mc"
    else:
        tasks = [] if spec in ("", "none") else [t.strip() for t in spec.split(",") if t.strip()]
        mc_dir = None
    return ValidationSets(redteam=prompts(pc.validation_redteam, "redteam"),
                          conversation=(fit_to_models([EvalPrompt(prompt=p) for p in held_out], {"start": start},
                                                      cfg)[0] if held_out
                                        else prompts(pc.validation_conversation, "conversation")),
                          tasks=tasks, mc_dir=mc_dir, limit=pc.validation_general_limit,
                          toy_redteam=pc.validation_redteam is None)
