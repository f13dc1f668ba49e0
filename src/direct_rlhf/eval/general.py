"""General-capability scores, computed by lm-evaluation-harness in-process.

lm-eval is the engine so that our numbers mean what everyone else's mean: the same prompts,
the same log-likelihood scoring, the same stderr. We call it as a library with the model
object already in memory (no second load from disk), offline, writing nothing to the working
directory. The toy world's held-out multiple-choice files become lm-eval tasks through
`write_toy_tasks`, which materialises one YAML per family (absolute data paths) per run.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import UserError
from ..io import atomic_file, read_jsonl

TOY_FAMILIES: tuple[str, ...] = (
    "capitals", "continents", "addition", "subtraction", "larger_number", "antonyms",
    "plurals", "animal_classes", "colours", "what_comes_next", "first_letter",
)
TOY_GROUP = "toy_general"

STANDARD_TASKS: tuple[str, ...] = (
    "mmlu", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "boolq",
    "openbookqa", "social_iqa", "truthfulqa_mc2", "gsm8k",
)
"""The `--general standard` preset for real models (lm-eval task ids; SIQA's id is `social_iqa`).

Their datasets come from the Hugging Face Hub: they need network access, or must already be
in the HF datasets cache when running with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1.
"""

_METRICS = ({"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})


def validate_mc_file(path: Path) -> int:
    """Check every line of an MC JSONL file; return the number of questions.

    lm-eval would fail on a bad row deep inside a Jinja template or silently mis-score it
    (an out-of-range answer), so we reject it first with `file:line: problem`.
    """
    rows = read_jsonl(path, required=("question", "choices", "answer"))
    for row in rows:
        at, q, ch, ans = f"{path}:{row['_line']}", row["question"], row["choices"], row["answer"]
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{at}: 'question' must be a non-empty string")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise UserError(f"{at}: 'choices' must be a list of at least 2 strings")
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(ch):
            raise UserError(f"{at}: 'answer' must be an integer index into 'choices' (0..{len(ch) - 1})")
    if not rows:
        raise UserError(f"{path}: no questions")
    return len(rows)


def write_toy_tasks(mc_dir: Path, out_dir: Path) -> Path:
    """Write lm-eval task YAMLs (`toy_<family>` + group `toy_general`) for the files in mc_dir.

    Generated rather than shipped because the data path is absolute and differs per run.
    Families without a file are left out (the group averages the ones present). Returns out_dir,
    ready to pass as `include_path`.
    """
    mc_dir, out_dir = Path(mc_dir).resolve(), Path(out_dir)
    present = [f for f in TOY_FAMILIES if (mc_dir / f"{f}.jsonl").is_file()]
    if not present:
        raise UserError(f"{mc_dir}: no MC files (expected e.g. {TOY_FAMILIES[0]}.jsonl)")
    for fam in present:
        validate_mc_file(mc_dir / f"{fam}.jsonl")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("toy_*.yaml"):
        stale.unlink()
    docs = {f"toy_{fam}": {
        "task": f"toy_{fam}", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(mc_dir / f"{fam}.jsonl")}},
        "output_type": "multiple_choice", "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer", "target_delimiter": " ",
        "metric_list": list(_METRICS), "metadata": {"version": 1.0},
    } for fam in present}
    docs[TOY_GROUP] = {
        "group": TOY_GROUP, "task": [f"toy_{fam}" for fam in present],
        "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": False}
                                  for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    for name, doc in docs.items():
        with atomic_file(out_dir / f"{name}.yaml") as tmp:
            Path(tmp).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out_dir


def _quiet_lm_eval() -> None:
    """Warnings only: lm-eval logs every task and request at INFO, which buries our own output."""
    for name in ("lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # "Generating test split" bars, once per task per run
    # Passing a model object is how we mean to use HFLM; its warning about it is noise.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)


@contextlib.contextmanager
def _no_git_probe():
    """lm-eval records the current directory's commit by running `git describe`, whose "fatal: not
    a git repository" reaches the terminal whenever we run outside one; we never use that field."""
    import lm_eval.evaluator

    probe = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    if probe is None:  # a later lm-eval without it
        yield
        return
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = probe


# lm-eval's bars that finish at once, one per task and model (building a task's requests,
# tokenising them): 33 lines of "12/12" in a demo's terminal, telling nothing
_INSTANT_BARS = ("lm_eval.api.task", "lm_eval.api.model")
# the bar of the model's own work ("Running loglikelihood requests"), minutes long on a 7B
_WORK_BARS = ("lm_eval.models.huggingface",)


@contextlib.contextmanager
def _lm_eval_bars(show: bool):
    """lm-eval draws its own tqdm bars and has no switch for some of them, so their modules'
    `tqdm` is a disabled one while it runs: always for the instant ones, and for all of them
    when progress is off."""
    from tqdm import tqdm

    names = _INSTANT_BARS if show else _INSTANT_BARS + _WORK_BARS
    mods = [importlib.import_module(m) for m in names]
    mods = [m for m in mods if getattr(m, "tqdm", None) is tqdm]

    def quiet(*args, **kwargs):  # a call's own disable= must not switch it back on
        return tqdm(*args, **{**kwargs, "disable": True})

    for m in mods:
        m.tqdm = quiet
    try:
        yield
    finally:
        for m in mods:
            m.tqdm = tqdm


def _pick(res: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    """(value, stderr) of `metric` under its first filter ("acc,none", "exact_match,strict-match")."""
    for key, val in res.items():
        if key.split(",")[0] == metric and "_stderr" not in key:
            err = res.get(key.replace(",", "_stderr,", 1))
            return float(val), (float(err) if isinstance(err, (int, float)) else None)
    return None, None


def evaluate_general(model: Any, tokenizer: Any, tasks: list[str], include_path: Path | None,
                     batch_size: int = 32, limit: int | None = None, device: str = "cpu",
                     progress: bool = True) -> dict:
    """Score an in-memory HF causal LM on lm-eval tasks; return plain floats per task + `_mean`.

    `acc` is the task's accuracy (`exact_match` for generative tasks such as gsm8k); metrics a
    task does not have are None. Toy tasks need `include_path` from `write_toy_tasks`; when only
    toy tasks are asked for, lm-eval's ~10k built-in task configs are not even indexed.
    """
    from datasets.exceptions import DatasetNotFoundError
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    tasks = list(dict.fromkeys(tasks))  # a repeated name would be evaluated twice
    if not tasks:
        raise UserError("no general-capability tasks requested")
    toy = [t for t in tasks if t.startswith("toy_")]
    if toy and include_path is None:
        raise UserError(f"toy tasks {toy} need the task folder written by write_toy_tasks")
    for t in toy:  # re-check the data: the files may have changed since they were materialised
        cfg = Path(include_path) / f"{t}.yaml"
        if t != TOY_GROUP and cfg.is_file():
            validate_mc_file(Path(yaml.safe_load(cfg.read_text())["dataset_kwargs"]["data_files"]["test"]))
    tm = TaskManager(include_path=str(include_path) if include_path else None,
                     include_defaults=len(toy) < len(tasks))
    built: list[Any] = []
    for name in tasks:  # one at a time, so an offline failure names its task
        try:
            loaded = tm.load([name])
        except KeyError as err:
            if "not a registered" not in str(err):
                raise
            raise UserError(f"unknown lm-eval task '{name}'") from None
        except (ConnectionError, DatasetNotFoundError) as err:
            raise UserError(f"lm-eval task '{name}': its dataset is not available offline; it must be "
                            f"reachable online or already in the HF datasets cache ({type(err).__name__})") from None
        obj = loaded["groups"].get(name) or loaded["tasks"].get(name)
        if obj is None:
            raise UserError(f"lm-eval task '{name}' is a tag; list its tasks instead")
        built.append(obj)
    # lm-eval refuses a task asked for both alone and inside a group; the group's run reports
    # its members anyway, so drop the standalone copies.
    in_groups = {t.task_name for o in built if hasattr(o, "get_all_tasks") for t in o.get_all_tasks()}
    run = [o for name, o in zip(tasks, built) if hasattr(o, "get_all_tasks") or name not in in_groups]

    # Evaluate on `device`, then put the model back where and how (train/eval) the caller had it.
    was_training, old_device, target = model.training, model.device, torch.device(device)
    move = old_device.type != target.type or target.index not in (None, old_device.index)
    if move:
        model.to(target)
    try:
        with _lm_eval_bars(progress), _no_git_probe():
            out = lm_eval.simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                tasks=run, task_manager=tm, limit=limit, batch_size=batch_size,
                use_cache=None, cache_requests=False, write_out=False, log_samples=False,
                # None: leave the caller's global RNGs alone (lm-eval would reseed random/numpy/torch).
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            )
    finally:
        if move:
            model.to(old_device)
        model.train(was_training)

    results, counts = out["results"], out.get("n-samples", {})
    leaves = {g: [t.task_name for t in obj.get_all_tasks()] for g, obj in zip(tasks, built)
              if hasattr(obj, "get_all_tasks")}
    scores: dict[str, Any] = {}
    for name in tasks:
        acc, acc_se = _pick(results[name], "acc")
        if acc is None:
            acc, acc_se = _pick(results[name], "exact_match")
        norm, norm_se = _pick(results[name], "acc_norm")
        n = sum(counts[t]["effective"] for t in leaves.get(name, [name]))
        scores[name] = {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se, "n": n}
    accs = [s["acc"] for s in scores.values() if s["acc"] is not None]
    norms = [s["acc_norm"] for s in scores.values() if s["acc_norm"] is not None]
    scores["_mean"] = {"acc": sum(accs) / len(accs) if accs else None,
                       "acc_norm": sum(norms) / len(norms) if norms else None}
    return scores
