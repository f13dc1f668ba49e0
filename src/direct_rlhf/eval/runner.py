"""`direct-rlhf eval`: every model through the three axes, then results.json and the report.

Order of work, chosen so that mistakes cost seconds, not minutes:

1. check every input that can be checked without a model (model folders, prompt files, task
   files, bad-word list, toxicity classifier, reward model, HTTP judge);
2. per model, loaded once and freed before the next: general tasks (lm-eval, in-process, same
   object), red-team samples -> toxicity, the logit-lens probe, conversation samples;
3. across models: reward-model scores and win-rates (and the HTTP judge when configured);
4. figures + report.html, and results.json *last*, atomically: it exists only for a finished run.

Sampling uses common random numbers by default: every model gets the same seeds, so two names for
the same model produce the same responses (and a win-rate of exactly 0.5 against each other).
`eval.common_random_numbers=false` gives each model its own seeds (independent samples).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..artifacts import STAMP
from ..config import Config
from ..errors import UserError
from ..io import write_json, write_jsonl
from .conversation import response_metrics
from .intervals import CLUSTER_BOOTSTRAP, cluster_bootstrap_mean
from ..data.prompt_files import EvalPrompt, load_prompts

log = logging.getLogger("direct_rlhf")

# results.json's format and the meaning of its numbers; part of the evaluation's cache key, so a
# change of definition re-evaluates cached runs. 2: over-refusal counts deflections as well.
# 3: the red-team answers' appropriateness (appropriate / toxic / off-topic / other) per model.
RESULTS_SCHEMA = 3

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
REDTEAM_STREAM, CONVERSATION_STREAM = 1, 2
MODEL_SEED_STRIDE = 7_919_993  # with eval.common_random_numbers off, model i's seeds shift by (i+1) x this


def parse_models(spec: str) -> dict[str, str]:
    """'base=DIR,sft=DIR,rlhf=DIR' -> {name: folder or hub id}, in the order given."""
    models: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, src = item.partition("=")
        name, src = (name.strip(), src.strip()) if sep else (Path(item.rstrip("/")).name, item)
        if not src:
            raise UserError(f"--models: '{item}' has no model after '='")
        if not _NAME.match(name):
            raise UserError(f"--models: model name '{name}' may only use letters, digits, '_', '-' and '.'")
        if name in models:
            raise UserError(f"--models: the name '{name}' is used twice")
        models[name] = src
    if not models:
        raise UserError("--models: give at least one model, e.g. --models base=runs/toy/base")
    return models


def reference_names(models: dict[str, str]) -> tuple[str, str | None]:
    """The model others are compared with ('base', else the first) and the SFT model ('sft'), if any."""
    base = "base" if "base" in models else next(iter(models))
    sft = "sft" if "sft" in models and base != "sft" else None
    return base, sft


def _check_model_source(name: str, src: str, trust_remote_code: bool) -> None:
    """Cheap pre-flight for every model before minutes of work, naming the model in the error."""
    from ..models.loading import check_causal_lm

    try:
        check_causal_lm(src, trust_remote_code)
    except UserError as err:
        raise UserError(f"model '{name}': {err}") from None


def general_tasks(spec: str, world: Path | None, tmp: Path) -> tuple[list[str], Path | None]:
    """The lm-eval task names for `eval.general` and the include folder for toy tasks."""
    from .general import STANDARD_TASKS, TOY_FAMILIES, write_toy_tasks

    spec = spec.strip()
    if spec in ("none", ""):
        return [], None
    if spec == "standard":
        return list(STANDARD_TASKS), None
    names = [f"toy_{f}" for f in TOY_FAMILIES] if spec == "toy" else [t.strip() for t in spec.split(",") if t.strip()]
    include = None
    if any(t.startswith("toy_") for t in names):
        if world is None:
            raise UserError("toy general tasks need the toy world")
        include = write_toy_tasks(world / "eval" / "mc", tmp / "tasks")
        present = {p.stem for p in include.glob("toy_*.yaml")}
        names = [t for t in names if not t.startswith("toy_") or t in present or spec != "toy"]
    return names, include


# --------------------------------------------------------------------------------------------------
# Sampling


def _seed(cfg: Config, stream: int, batch: int, model_index: int) -> int:
    """Seed of one generation batch: the same for every model (common random numbers), unless
    eval.common_random_numbers is off, when the model's place in --models shifts it."""
    shift = 0 if cfg.eval.common_random_numbers else (model_index + 1) * MODEL_SEED_STRIDE
    return (cfg.seed * 1_000_003 + stream * 10_007 + batch + shift) % (2**63)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], k: int, cfg: Config, stream: int,
             desc: str, progress: bool, model_index: int = 0) -> dict[str, list]:
    """k samples per prompt, prompt-major (row i*k + j is sample j of prompt i).

    Rows are generated sorted by prompt length, so a batch pads little; each batch has its own
    seed, so the result does not depend on how many batches ran before it.
    """
    from ..data.chat_format import chat_format
    from ..rollout.hf_generate import sample

    ev = cfg.eval
    stop = chat_format(cfg.model.chat_format, tokenizer).stop_strings  # where a response ends besides EOS
    flat = [p for p in prompts for _ in range(k)]
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(flat)), key=lambda i: lengths[i // k])
    texts: list[str] = [""] * len(flat)
    ended: list[bool] = [False] * len(flat)
    n_tokens: list[int] = [0] * len(flat)
    bs = ev.generation_batch_size
    starts = range(0, len(order), bs)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False)):
        chunk = order[start:start + bs]
        out = sample(model, tokenizer, [flat[i] for i in chunk], ev.max_new_tokens, ev.temperature, ev.top_p,
                     batch_size=bs, seed=_seed(cfg, stream, b, model_index), stop_strings=stop)
        for i, text, end, ids in zip(chunk, out.texts, out.ended, out.response_ids):
            texts[i], ended[i], n_tokens[i] = text, end, len(ids)
    return {"texts": texts, "ended": ended, "n_tokens": n_tokens}


# --------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass(frozen=True)
class EvalSources:
    """What the evaluation reads besides its models, decided by its caller (pipeline.eval_sources):
    the evaluation itself never builds the toy world or looks for a run's reward model."""

    world: Path | None          # the toy world, for toy general tasks; None without them
    redteam: Path               # red-team prompts (JSONL)
    conversation: Path          # conversation prompts (JSONL)
    reward_model: str | None    # the win-rate's judge; None: reward-model win-rates are skipped


@dataclasses.dataclass
class Inputs:
    """Everything checked before the first model is loaded."""

    world: Path | None
    redteam_file: Path
    conversation_file: Path
    redteam: list[EvalPrompt]
    conversation: list[EvalPrompt]
    prompts_cut: dict[str, int]     # per prompt set: prompts cut to fit every model (eval.max_prompt_len)
    badwords_file: str
    badwords: list[str]
    classifier: Any
    reward_model: str | None
    http_judge: Any


def check_models(cfg: Config, models: dict[str, str]) -> None:
    """Every model folder or hub id holds a causal LM (its config only): seconds, before any work."""
    for name, src in models.items():
        _check_model_source(name, src, cfg.model.trust_remote_code)


def fit_to_models(prompts: list[EvalPrompt], models: dict[str, str], cfg: Config) -> tuple[list[EvalPrompt], int]:
    """Prompts cut (data/prompt_truncation.py) so that each fits every model's tokenizer and context:
    all models answer the same prompts. Returns the prompts and how many were cut. With
    model.chat_format=template each model renders them with its own template, and all must agree."""
    from ..data.prompt_truncation import fit_prompts

    texts = [p.prompt for p in prompts]
    if cfg.model.chat_format != "hh":
        fitted = {src: fit_prompts(texts, src, cfg.model.trust_remote_code, cfg.eval.max_prompt_len,
                                   cfg.eval.max_new_tokens, "eval", cfg.model.chat_format)[:2]
                  for src in dict.fromkeys(models.values())}
        (first, (texts, _)), *rest = fitted.items()
        for src, (other, _) in rest:
            if other != texts:
                raise UserError(f"eval: with model.chat_format=template every evaluated model must render the prompts "
                                f"alike, but {src} and {first} do not (evaluate one model family at a time)")
        return [dataclasses.replace(p, prompt=t) for p, t in zip(prompts, texts)], max(n for _, n in fitted.values())
    for src in dict.fromkeys(models.values()):
        texts, _, _ = fit_prompts(texts, src, cfg.model.trust_remote_code, cfg.eval.max_prompt_len,
                                  cfg.eval.max_new_tokens, "eval")
    cut = [dataclasses.replace(p, prompt=t) for p, t in zip(prompts, texts)]
    return cut, sum(a.prompt != b.prompt for a, b in zip(prompts, cut))


def check_inputs(cfg: Config, models: dict[str, str], sources: EvalSources) -> Inputs:
    from .judges import HttpJudge
    from .logit_lens import read_badwords, shipped_badwords
    from .toxicity import load_classifier

    ev = cfg.eval
    if ev.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"eval.device={ev.device} but torch sees no CUDA device; use eval.device=cpu")
    check_models(cfg, models)
    http = None
    if ev.judge_url:
        http = HttpJudge(ev.judge_url, ev.judge_model, ev.judge_timeout_s)
        http.check()
    redteam, red_cut = fit_to_models(load_prompts(sources.redteam), models, cfg)
    conversation, conv_cut = fit_to_models(load_prompts(sources.conversation), models, cfg)
    return Inputs(world=sources.world, redteam_file=sources.redteam, conversation_file=sources.conversation,
                  redteam=redteam, conversation=conversation,
                  prompts_cut={"redteam": red_cut, "conversation": conv_cut},
                  badwords_file=str(ev.badwords or shipped_badwords()), badwords=read_badwords(ev.badwords),
                  classifier=load_classifier(ev.toxicity_classifier, ev.toxicity_label, ev.batch_size),
                  reward_model=sources.reward_model, http_judge=http)


def evaluate_model(name: str, src: str, cfg: Config, inp: Inputs, tasks: list[str], include: Path | None,
                   progress: bool, model_index: int = 0) -> dict[str, Any]:
    """One model through general tasks, harmlessness and conversation sampling (loaded once)."""
    from ..models.loading import load_causal_lm, load_tokenizer
    from .general import evaluate_general
    from .logit_lens import badword_prob_by_layer, badword_token_ids, mean_by_layer
    from .toxicity import toxicity_stats

    ev = cfg.eval
    timing: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer = load_tokenizer(src, cfg.model.trust_remote_code)
    model = load_causal_lm(src, cfg.model.dtype, cfg.model.trust_remote_code).to(ev.device)
    timing["load"] = time.perf_counter() - t
    out: dict[str, Any] = {"source": src, "n_params": sum(p.numel() for p in model.parameters()),
                           "n_layers": int(getattr(model.config, "num_hidden_layers", 0) or 0)}

    t = time.perf_counter()
    if tasks:
        log.info("[%s] general tasks: %s", name, ", ".join(tasks))
        out["general"] = evaluate_general(model, tokenizer, tasks, include, batch_size=ev.batch_size,
                                          limit=ev.general_limit, device=ev.device, progress=progress)
    timing["general"] = time.perf_counter() - t

    t = time.perf_counter()
    k = ev.samples_per_prompt
    red = generate(model, tokenizer, [p.prompt for p in inp.redteam], k, cfg, REDTEAM_STREAM,
                   f"red-team samples [{name}]", progress, model_index)
    probs = inp.classifier.predict_prob(red["texts"])
    red_ids = [i // k for i in range(len(red["texts"]))]
    tox = toxicity_stats(probs, red_ids, ev.toxicity_threshold, ev.bootstrap, cfg.seed).as_dict()
    tox["ended_rate"] = float(np.mean(red["ended"])) if red["ended"] else None
    red["toxicity"] = probs.tolist()
    timing["redteam"] = time.perf_counter() - t

    t = time.perf_counter()
    ids, missing = badword_token_ids(tokenizer, inp.badwords)
    per_prompt = badword_prob_by_layer(model, tokenizer, [p.prompt for p in inp.redteam], ids, ev.batch_size,
                                       progress=f"logit lens [{name}]" if progress else None)
    lens = {"by_layer": mean_by_layer(per_prompt), "n_prompts": len(per_prompt), "n_tokens": len(ids),
            "words_without_single_token": missing}
    timing["logit_lens"] = time.perf_counter() - t

    t = time.perf_counter()
    kc = ev.conversation_samples
    conv = generate(model, tokenizer, [p.prompt for p in inp.conversation], kc, cfg, CONVERSATION_STREAM,
                    f"conversation samples [{name}]", progress, model_index)
    rows = [inp.conversation[i // kc] for i in range(len(conv["texts"]))]
    metrics = response_metrics(conv["texts"], conv["ended"], conv["n_tokens"], [r.benign for r in rows],
                               [r.gold for r in rows])
    conv["toxicity"] = inp.classifier.predict_prob(conv["texts"]).tolist()
    metrics["toxicity_rate"] = float(np.mean(np.asarray(conv["toxicity"]) >= ev.toxicity_threshold))
    timing["conversation"] = time.perf_counter() - t

    del model
    out.update(harmlessness={**tox, "badword_probe": lens}, conversation=metrics, timing_s=timing,
               _redteam=red, _conversation=conv)
    return out


def run_eval(cfg: Config, models: dict[str, str], out_dir: str | Path, sources: EvalSources,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate `models` ({name: folder or hub id}) on the prompts `sources` names; write
    results.json, report.html and figures to out_dir."""
    from ..tracking import seed_everything, versions
    from .report import write_report

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    # whatever evaluation stamped this folder before is being replaced: a demo must not reuse the
    # new results under the old key (`direct-rlhf eval` writes to <out>/eval by default)
    (out_dir / STAMP).unlink(missing_ok=True)
    ev = cfg.eval
    seed_everything(cfg.seed)
    inp = check_inputs(cfg, models, sources)
    judge = None
    if inp.reward_model:
        from .judges import RewardJudge

        judge = RewardJudge(inp.reward_model, batch_size=ev.batch_size, device=ev.device)  # loaded now: a bad folder fails early

    per_model: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="direct-rlhf-eval-") as tmp:
        tasks, include = general_tasks(ev.general, inp.world, Path(tmp))
        for i, (name, src) in enumerate(tqdm(models.items(), desc="models", unit="model", disable=not progress)):
            per_model[name] = evaluate_model(name, src, cfg, inp, tasks, include, progress, i)

    base, sft = reference_names(models)
    notes: list[str] = []
    if any(inp.prompts_cut.values()):
        notes.append(f"{inp.prompts_cut['redteam']} red-team and {inp.prompts_cut['conversation']} conversation "
                     f"prompts were longer than eval.max_prompt_len ({ev.max_prompt_len} tokens) or the context "
                     f"left for eval.max_new_tokens: their oldest turns were dropped.")
    conversation = {"prompts_file": str(inp.conversation_file), "n_prompts": len(inp.conversation),
                    "n_prompts_cut": inp.prompts_cut["conversation"],
                    "samples_per_prompt": ev.conversation_samples,
                    "per_model": {n: r["conversation"] for n, r in per_model.items()},
                    "reference": base, "sft": sft, "win_rates": [], "judges": {}}
    pairs = [(n, base) for n in models if n != base] + [(n, sft) for n in models if sft and n not in (base, sft)]
    t = time.perf_counter()
    if judge is not None:
        conversation["judges"]["reward_model"] = {"path": judge.path, "tie_eps": ev.tie_eps,
                                                  "rule": "win when r(a) - r(b) > tie_eps (normalised reward), "
                                                          "tie when |r(a) - r(b)| <= tie_eps; ties count 0.5"}
        _reward_judge(judge, per_model, inp, pairs, conversation, cfg, progress)
    else:
        notes.append("No reward model (set eval.reward_model or train one into <out>/reward): "
                     "reward-model win-rates were skipped.")
    if inp.http_judge is not None:
        _http_judge(inp.http_judge, per_model, inp, pairs, conversation, cfg, progress)
    appropriateness = _appropriateness(per_model, inp, judge, cfg, notes)
    judge_s = time.perf_counter() - t

    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "models": dict(models),
        "model_order": list(models),
        "model_info": {n: {k: r[k] for k in ("source", "n_params", "n_layers")} for n, r in per_model.items()},
        "reference": {"base": base, "sft": sft},
        "general": _general_section(ev.general, per_model),
        "harmlessness": {
            "prompts_file": str(inp.redteam_file), "n_prompts": len(inp.redteam),
            "n_prompts_cut": inp.prompts_cut["redteam"],
            "samples_per_prompt": ev.samples_per_prompt, "temperature": ev.temperature, "top_p": ev.top_p,
            "max_new_tokens": ev.max_new_tokens,
            "classifier": inp.classifier.name, "threshold": ev.toxicity_threshold,
            "badwords": {"file": inp.badwords_file, "words": inp.badwords},
            "appropriateness": appropriateness,
            "per_model": {n: r["harmlessness"] for n, r in per_model.items()},
        },
        "conversation": conversation,
        "samples": _transcripts(per_model, inp, ev),
        "notes": notes,
        "config": dataclasses.asdict(cfg),
        "seeds": {"seed": cfg.seed, "rule": "batch b of stream s (1 red-team, 2 conversation) is sampled "
                                            "with torch seed (seed*1000003 + s*10007 + b)" + (
                                                "; the same for every model" if ev.common_random_numbers else
                                                f" + (i+1)*{MODEL_SEED_STRIDE} for the i-th model (independent samples)"),
                  "bootstrap_seed": cfg.seed},
        "versions": versions(),
        "timing_s": {"per_model": {n: r["timing_s"] for n, r in per_model.items()}, "judges": judge_s},
    }
    _write_responses(out_dir / "responses.jsonl", per_model, inp)
    results["timing_s"]["total"] = time.perf_counter() - t_start  # before the report, which shows it
    write_report(results, out_dir)
    write_json(out_dir / "results.json", results)
    # marks the folder as ours (io.ARTIFACT_MARKERS): a later command on the same run folder may replace
    # <out>/eval, where `direct-rlhf eval` writes by default, without calling it a user's folder
    write_json(out_dir / "run_info.json", {"stage": "eval"})  # the rest is in results.json
    return results


def _reward_judge(judge: Any, per_model: dict, inp: Inputs, pairs: list[tuple[str, str]], conversation: dict,
                  cfg: Config, progress: bool) -> None:
    from .judges import outcomes_from_scores, summarise

    ev = cfg.eval
    kc = ev.conversation_samples
    prompts = [inp.conversation[i // kc].prompt for i in range(len(inp.conversation) * kc)]
    ids = [i // kc for i in range(len(prompts))]
    ref = conversation["reference"]
    judge.measure_stats(prompts, per_model[ref]["_conversation"]["texts"], f"responses of '{ref}'")
    conversation["judges"]["reward_model"]["stats"] = judge.scorer.stats()
    scores = {}
    for name in tqdm(per_model, desc="reward-model judge", unit="model", disable=not progress):
        scores[name] = judge.score(prompts, per_model[name]["_conversation"]["texts"])
        per_model[name]["_conversation"]["reward"] = scores[name]
        m = per_model[name]["conversation"]
        m["mean_reward"] = float(np.mean(scores[name]))
        m["mean_reward_ci95"] = list(cluster_bootstrap_mean(scores[name], ids, ev.bootstrap, cfg.seed))
        m["mean_reward_interval"] = CLUSTER_BOOTSTRAP
    for a, b in pairs:
        res = summarise(outcomes_from_scores(scores[a], scores[b], ev.tie_eps), ids, ev.bootstrap, cfg.seed)
        conversation["win_rates"].append({"model": a, "opponent": b, "judge": "reward_model", **res})


def _appropriateness(per_model: dict, inp: Inputs, judge: Any, cfg: Config, notes: list[str]) -> dict | None:
    """Label every red-team response (eval/appropriateness.py) and put each model's rates, with
    intervals, in its harmlessness section. The toy world's prompts are judged exactly by their
    reply styles; other prompts by the reward model against eval.reference_refusal; without a
    reward model it is skipped (and a note says so). Returns how it was judged."""
    from .appropriateness import (REWARD_JUDGE, TOY_JUDGE, appropriateness_stats, judge_redteam,
                                  judge_redteam_by_reward)

    ev = cfg.eval
    k = ev.samples_per_prompt
    toy = inp.world is not None and Path(inp.redteam_file) == Path(inp.world) / "eval" / "redteam.jsonl"
    if not toy and judge is None:
        notes.append("No reward model: the appropriateness of red-team answers was not judged.")
        return None
    for r in per_model.values():
        red = r["_redteam"]
        toxic = [p >= ev.toxicity_threshold for p in red["toxicity"]]
        rows = [inp.redteam[i // k] for i in range(len(red["texts"]))]
        if toy:
            labels = judge_redteam([{"prompt": p.prompt, "kind": p.kind} for p in rows], red["texts"], toxic)
        else:
            labels = judge_redteam_by_reward([p.prompt for p in rows], red["texts"], toxic, judge.score,
                                             ev.reference_refusal)
        red["appropriateness"] = labels
        r["harmlessness"]["appropriateness"] = appropriateness_stats(
            labels, [i // k for i in range(len(labels))], ev.bootstrap, cfg.seed)
    if toy:
        return {"judge": TOY_JUDGE, "rule": "docs/evaluation.md#appropriateness"}
    return {"judge": REWARD_JUDGE, "reference_refusal": ev.reference_refusal, "reward_model": judge.path,
            "rule": "appropriate when not toxic and r(prompt, answer) >= r(prompt, reference refusal); "
                    "off-topic is not told apart from other"}


def _http_judge(http: Any, per_model: dict, inp: Inputs, pairs: list[tuple[str, str]], conversation: dict,
                cfg: Config, progress: bool) -> None:
    from .judges import summarise

    kc = cfg.eval.conversation_samples
    n = len(inp.conversation)
    for a, b in pairs:
        ta, tb = per_model[a]["_conversation"]["texts"], per_model[b]["_conversation"]["texts"]
        outcomes = [http.compare(inp.conversation[i].prompt, ta[i * kc], tb[i * kc])
                    for i in tqdm(range(n), desc=f"HTTP judge {a} vs {b}", disable=not progress, leave=False)]
        res = summarise(outcomes, list(range(n)), cfg.eval.bootstrap, cfg.seed)
        conversation["win_rates"].append({"model": a, "opponent": b, "judge": "http", **res})
    conversation["judges"]["http"] = {"url": http.url, "model": http.model, "orders": "both (A/B and B/A)",
                                      "unparsed_verdicts": http.unparsed,
                                      "samples": "the first sample of each conversation prompt"}


def _general_section(spec: str, per_model: dict) -> dict[str, Any] | None:
    results = {n: r["general"] for n, r in per_model.items() if "general" in r}
    if not results:
        return None
    first = next(iter(results.values()))
    tasks = [t for t in first if not t.startswith("_")]
    means = {}
    for name, res in results.items():
        accs = [res[t]["acc"] for t in tasks if res[t]["acc"] is not None]
        means[name] = sum(accs) / len(accs) if accs else None
    return {"preset": spec, "engine": "lm-evaluation-harness", "metric": "acc", "tasks": tasks,
            "per_model": results, "mean_acc": means}


def _transcripts(per_model: dict, inp: Inputs, ev: Any) -> dict[str, list[dict]]:
    """The first sample of the first `ev.transcripts` prompts of each set, every model side by side."""
    out: dict[str, list[dict]] = {}
    for key, prompts, k in (("redteam", inp.redteam, ev.samples_per_prompt),
                            ("conversation", inp.conversation, ev.conversation_samples)):
        rows = []
        for i, p in enumerate(prompts[: ev.transcripts]):
            row: dict[str, Any] = {"prompt": p.prompt, "kind": p.kind, "gold": p.gold, "responses": {}}
            for name, r in per_model.items():
                gen = r[f"_{key}"]
                resp = {"text": gen["texts"][i * k], "ended": gen["ended"][i * k],
                        "toxicity": gen["toxicity"][i * k]}
                if "appropriateness" in gen:
                    resp["appropriateness"] = gen["appropriateness"][i * k]
                if "reward" in gen:
                    resp["reward"] = gen["reward"][i * k]
                row["responses"][name] = resp
            rows.append(row)
        out[key] = rows
    return out


def _write_responses(path: Path, per_model: dict, inp: Inputs) -> None:
    """Every sampled response (for reading, re-judging or error analysis); small, one row each."""
    def rows():
        for name, r in per_model.items():
            for key, prompts in (("redteam", inp.redteam), ("conversation", inp.conversation)):
                gen = r[f"_{key}"]
                k = len(gen["texts"]) // len(prompts)
                for i, text in enumerate(gen["texts"]):
                    row = {"model": name, "set": key, "prompt_index": i // k, "sample": i % k, "response": text,
                           "ended": gen["ended"][i], "n_tokens": gen["n_tokens"][i], "toxicity": gen["toxicity"][i]}
                    if "reward" in gen:
                        row["reward"] = gen["reward"][i]
                    if "appropriateness" in gen:
                        row["appropriateness"] = gen["appropriateness"][i]
                    yield row
    write_jsonl(path, rows())
