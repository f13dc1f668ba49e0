"""The balance guard: PPO watches all three axes while it trains, and keeps the best-balanced policy.

Every `ppo.eval_every` steps (and at the end) the current policy is evaluated on validation sets
(eval/validation.py); the start policy's own numbers, measured once before the first step, are the
reference of the tests (docs/guard.md):

    general      accuracy >= the start's - ppo.max_capability_drop points
    toxicity     toxicity rate <= ppo.max_toxicity_ratio x the start's
    appropriate  share of red-team answers judged appropriate >= ppo.min_appropriate (0: no test)

The last two are the harmlessness axis: not toxic, and not evasive either. `ppo.select=balanced`
keeps the evaluated step with the best validation win-rate among those that pass all three. When
none does, the fallbacks, recorded as such: the best win-rate among those that pass general and
toxicity; then among those that pass general; when none does, the step with the highest general
accuracy. Ties go to the earlier step (closer to the start). `ppo.patience` > 0 stops training once general accuracy has
stayed below its bound for that many evaluations in a row (as the KL stop does, with its reason).

Only the checkpoints that may still be chosen are kept (hard links to the trainer's checkpoint
folders under <work>/guard/, so the trainer's own pruning does not remove them; under fsdp their DCP
shards, every process's); the rest are removed as soon as a better one is known. The selection
functions at the top are pure: they take evaluation records and decide, so the rule is tested on
hand-made records.

Under several processes every process calls the guard at the same points, since some of what it
does is collective under model.strategy=fsdp: gathering the sharded actor into a plain model on the
main process (`plain_policy`) and saving a checkpoint. Only the main process evaluates, chooses and
writes the guard's files; the others wait for it at the next broadcast.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import write_json

log = logging.getLogger("direct_rlhf")

Record = dict[str, Any]  # {"step": int, "general_acc": float | None, "toxicity": float | None, "win_rate": ...}


# ------------------------------------------------------------------ the rule (pure)
def bounds_passed(record: Record, reference: Record, pc: Any) -> dict[str, bool]:
    """Which of the three tests `record` passes against the start policy's `reference`; an axis that
    was not measured (no general tasks, no appropriateness judge) passes."""
    acc, ref_acc = record.get("general_acc"), reference.get("general_acc")
    general = acc is None or ref_acc is None or 100 * acc >= 100 * ref_acc - pc.max_capability_drop - 1e-9
    tox, ref_tox = record.get("toxicity"), reference.get("toxicity")
    toxicity = tox is None or ref_tox is None or tox <= pc.max_toxicity_ratio * ref_tox + 1e-12
    app = record.get("appropriate")
    appropriate = pc.min_appropriate <= 0 or app is None or app >= pc.min_appropriate - 1e-12
    return {"general": general, "toxicity": toxicity, "appropriate": appropriate}


def _best(records: list[Record], key: str) -> Record | None:
    """The record with the highest `key` (missing counts lowest), the earliest on ties."""
    best = None
    for r in records:
        if best is None or (r.get(key) if r.get(key) is not None else -1.0) > \
                (best.get(key) if best.get(key) is not None else -1.0):
            best = r
    return best


def tiers(records: list[Record], reference: Record, pc: Any) -> list[tuple[str, Record | None]]:
    """The rule's four tiers, in order, each with its best record so far (None: no record in it)."""
    passed = [(r, bounds_passed(r, reference, pc)) for r in records]
    every = [r for r, t in passed if all(t.values())]
    two = [r for r, t in passed if t["general"] and t["toxicity"]]
    general = [r for r, t in passed if t["general"]]
    return [("best win-rate among the steps that pass every test", _best(every, "win_rate")),
            ("fallback: no step passed every test; best win-rate among those that pass general and toxicity",
             _best(two, "win_rate")),
            ("fallback: no step passed general and toxicity; best win-rate among those that keep general "
             "accuracy", _best(general, "win_rate")),
            ("fallback: no step kept general accuracy; the step with the highest general accuracy",
             _best(records, "general_acc"))]


def choose(records: list[Record], reference: Record, pc: Any) -> dict[str, Any]:
    """The step `balanced` keeps, the rule that chose it, and why, in words."""
    for rule, best in tiers(records, reference, pc):
        if best is not None:
            return {"step": best["step"], "rule": rule, "why": _why(best, reference, pc)}
    raise ValueError("no evaluation to choose from")


def candidates(records: list[Record], reference: Record, pc: Any) -> set[int]:
    """The steps that may still be chosen however training goes on: the best record of the first
    tier that has one (a later step can only replace it by entering that tier or one above it)."""
    for _, best in tiers(records, reference, pc):
        if best is not None:
            return {best["step"]}
    return set()


def out_of_patience(records: list[Record], reference: Record, pc: Any) -> bool:
    """General accuracy below its bound at each of the last `ppo.patience` evaluations."""
    if pc.patience <= 0 or len(records) < pc.patience:
        return False
    return not any(bounds_passed(r, reference, pc)["general"] for r in records[-pc.patience:])


def _why(r: Record, ref: Record, pc: Any) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    acc, ref_acc = r.get("general_acc"), ref.get("general_acc")
    gen = "n/a" if acc is None or ref_acc is None else f"{100 * acc:.1f} vs start {100 * ref_acc:.1f}, " \
                                                      f"bound -{pc.max_capability_drop:g} points"
    app = f"; appropriate {pct(r.get('appropriate'))}, bound {pct(pc.min_appropriate)}" if pc.min_appropriate > 0 \
        else ""
    return (f"step {r['step']}: win-rate {r.get('win_rate', float('nan')):.3f} vs the start policy; "
            f"general accuracy {gen}; toxicity {pct(r.get('toxicity'))} vs start {pct(ref.get('toxicity'))}, "
            f"bound x{pc.max_toxicity_ratio:g}{app}")


# ------------------------------------------------------------------ the guard in the PPO loop
class BalanceGuard:
    """Evaluates, records and keeps candidates for a PPOTrainer (its `train(guard=...)` calls
    `start`, `after_step` and `finish`, on every process); only the main process evaluates and
    writes files (`validator`: None on the others)."""

    def __init__(self, validator: Any | None, pc: Any, work: Path, start_model: str, trust_remote_code: bool = False):
        self.validator, self.pc, self.dir = validator, pc, Path(work) / "guard"
        self.start_model, self.trust_remote_code = start_model, trust_remote_code
        self.reference: Record | None = None
        self.records: list[Record] = []
        self.selection: dict[str, Any] | None = None
        self._copy = None  # a plain model for a LoRA actor without a rollout copy, or of a sharded actor

    # -- records, kept across a resume
    def _save(self) -> None:
        write_json(self.dir / "evaluations.json", {"reference": self.reference, "records": self.records,
                                                   "reference_scores": self.validator.reference_scores})

    def _load(self, upto: int) -> None:
        path = self.dir / "evaluations.json"
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        self.reference = saved["reference"]
        # an evaluation off the ppo.eval_every grid was the end of a run that is now continued to more
        # steps: dropped, so that the continued run chooses as the longer run would
        self.records = [r for r in saved["records"] if r["step"] <= upto and r["step"] % self.pc.eval_every == 0]
        self.validator.reference_scores = saved.get("reference_scores")

    def start(self, trainer: Any) -> None:
        """Before the first step: the start policy's numbers (once: a resumed run reads them back)."""
        main = trainer.acc.is_main_process
        if main:
            if trainer.step_idx > 0:
                self._load(trainer.step_idx)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        needed = _broadcast(trainer, main and (self.reference is None or self.validator.reference_scores is None))
        if not needed:
            return
        if trainer.step_idx > 0:  # on every process: none is left waiting for the others
            raise RuntimeError(f"{self.dir}: no record of the start policy's evaluation to resume from")
        measured = self._evaluate(trainer)
        if main:
            self.reference = {"step": 0, **measured}
            self._save()
            log.info("guard: start policy %s", _short(self.reference))

    def due(self, trainer: Any) -> bool:
        """Every ppo.eval_every steps, and the last step (the run's end, or an early stop)."""
        return self.pc.eval_every > 0 and (trainer.step_idx % self.pc.eval_every == 0 or trainer.step_idx >= self.pc.steps
                                           or trainer.stopped_early is not None)

    def after_step(self, trainer: Any) -> Record | None:
        """At an evaluation step (`due`): evaluate; sets `trainer.stopped_early` when general accuracy
        ran out of patience. Returns the record (main process) for the caller to log with the step's
        row; the caller then saves its checkpoint and calls `keep`."""
        record, measured = None, self._evaluate(trainer)
        if measured is not None:  # the main process
            record = {"step": trainer.step_idx, **measured}
            record["passes"] = bounds_passed(record, self.reference, self.pc)
            self.records = [r for r in self.records if r["step"] != record["step"]] + [record]
            self._save()
            log.info("guard: step %d %s", record["step"], _short(record))
        stop = _broadcast(trainer, record is not None and out_of_patience(self.records, self.reference, self.pc))
        if stop and trainer.stopped_early is None:
            trainer.stopped_early = {"step": trainer.step_idx, "reason": (
                f"general validation accuracy below its bound (start - ppo.max_capability_drop="
                f"{self.pc.max_capability_drop:g} points) at the last ppo.patience={self.pc.patience} evaluations")}
            log.warning("ppo: stopped early at step %d: %s", trainer.step_idx, trainer.stopped_early["reason"])
        return record

    def keep(self, trainer: Any) -> None:
        """With ppo.select=balanced: keep this step's checkpoint if it may be chosen (saving it first
        unless the trainer just did), and remove the kept ones that no longer may."""
        if self.pc.select != "balanced":
            return
        step = trainer.step_idx
        # the main process's view, so that every process saves (collective under fsdp) or none does
        if _broadcast(trainer, not trainer.checkpoint_path(step).is_dir()):
            trainer.save_checkpoint()
        if not trainer.acc.is_main_process:
            return
        keep = candidates(self.records, self.reference, self.pc)
        if step in keep:
            _link_tree(trainer.checkpoint_path(step), self._kept(step))
        for old in self.dir.glob("step-*"):
            if int(old.name.removeprefix("step-")) not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def finish(self, trainer: Any) -> dict[str, Any] | None:
        """After the last step: evaluate it if it was not, then choose. Returns the selection (main
        process; None elsewhere), also kept in `self.selection`."""
        evaluated = _broadcast(trainer, bool(self.records) and self.records[-1]["step"] == trainer.step_idx)
        if not evaluated:  # a finished run resumed: its end was dropped as off the grid (`_load`)
            self.after_step(trainer)
            self.keep(trainer)
        if not trainer.acc.is_main_process:
            return None
        last = trainer.step_idx
        if self.pc.select == "last":
            chosen = {"step": last, "rule": "ppo.select=last: the last step", "why": _why(self.records[-1],
                                                                                           self.reference, self.pc)}
        else:
            chosen = choose(self.records, self.reference, self.pc)
        self.selection = {"select": self.pc.select, **chosen, "last_step": last,
                          "bounds": {"max_capability_drop_points": self.pc.max_capability_drop,
                                     "max_toxicity_ratio": self.pc.max_toxicity_ratio,
                                     "min_appropriate": self.pc.min_appropriate, "patience": self.pc.patience},
                          "data": "validation sets only (drawn apart from the test sets)",
                          "reference": self.reference, "evaluations": self.records}
        log.info("guard: kept step %d (%s)", chosen["step"], chosen["rule"])
        return self.selection

    def chosen_checkpoint(self) -> Path | None:
        """The kept checkpoint folder of the chosen step; None when it is the last step (the actor as it is)."""
        s = self.selection
        return None if s is None or s["step"] == s["last_step"] else self._kept(s["step"])

    def _kept(self, step: int) -> Path:
        return self.dir / f"step-{step:06d}"

    # -- evaluation
    def _evaluate(self, trainer: Any) -> Record | None:
        """The validation numbers of the trainer's current policy, on the main process; None on the
        others, which only take part in gathering it (`plain_policy`). Every RNG is put back after,
        so training draws the same numbers with the guard as without it."""
        from .checkpoint import rng_state, set_rng_state

        state = rng_state()
        try:
            policy = self.plain_policy(trainer)
            return None if policy is None else self.validator.evaluate(policy)
        finally:
            set_rng_state(state)
            if trainer.fsdp and self._copy is not None:  # the GPU's memory back to training
                self._copy.model.to("cpu")

    def plain_policy(self, trainer: Any) -> torch.nn.Module | None:
        """The current policy as a plain causal LM on the main process (None on the others), without
        touching the actor: the rollout copy when there is one, the actor itself when it has no
        adapters, else a copy made once. Under model.strategy=fsdp every process must call it: each
        parameter is gathered whole from every process's shards (`actor_weights`) into a copy on the
        main process, in model.dtype (what the sharded actor computes in; one whole model, e.g.
        14.5 GB for a 7B in bf16), kept in host memory between evaluations."""
        if trainer.fsdp:
            return self._gathered(trainer)
        if not trainer.acc.is_main_process:
            return None
        actor = trainer.acc.unwrap_model(trainer.actor)
        if trainer.rollout_copy is not None:
            return trainer.rollout_copy.sync(actor)
        if not hasattr(actor, "get_base_model"):
            return actor
        if self._copy is None:
            from ..rollout.policy_weights import MergedRolloutCopy

            self._copy = MergedRolloutCopy(self.start_model, self.trust_remote_code)
            self._copy.model.to(trainer.acc.device)
        return self._copy.sync(actor)

    def _gathered(self, trainer: Any) -> torch.nn.Module | None:
        """`plain_policy` of a sharded actor: the gather is collective, the copy the main process's."""
        from ..rollout.policy_weights import MergedRolloutCopy, actor_weights

        if not trainer.acc.is_main_process:
            for _ in actor_weights(trainer.actor):  # each parameter gathered, in the main process's order
                pass
            return None
        if self._copy is None:
            self._copy = MergedRolloutCopy(self.start_model, self.trust_remote_code, trainer.cfg.model.dtype)
        self._copy.model.to(trainer.acc.device)
        return self._copy.sync(trainer.actor)


def _broadcast(trainer: Any, flag: bool) -> bool:
    if trainer.acc.num_processes == 1:
        return flag
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([flag])[0])


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of a checkpoint folder made of hard links (no bytes copied; a plain copy across file systems)."""
    if dst.exists():
        shutil.rmtree(dst)
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def _short(r: Record) -> str:
    keys = ("general_acc", "toxicity", "appropriate", "win_rate", "gold_correct")
    return " ".join(f"{k}={r[k]:.3f}" for k in keys if r.get(k) is not None)
