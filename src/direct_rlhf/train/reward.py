"""Train a Bradley-Terry preference model: the reward model, or (roles swapped) the cost model.

Direct RLHF has no SFT stage to lean on, so this model is the only teacher the base model gets.
The loop is deliberately small and plain torch (top to bottom: batch -> one forward over chosen
and rejected together -> BT loss -> step), with held-out accuracy per subset measured as it goes.

The *cost model* (Safe-RLHF style, for PPO-Lagrangian) is the same model trained on the harmless
pairs with the roles swapped: the more harmful response is the "preferred" one, so a higher
score means more harm. As in Safe-RLHF, a classification term on each response's safety label
(`chosen_safe` / `rejected_safe`) puts unsafe responses above 0 and safe ones below, so the cost's
zero, and with it `ppo.cost_threshold`, means something (docs/ppo-lagrangian.md).
"""

from __future__ import annotations

import logging
import shutil
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..algos.bradley_terry import bradley_terry_loss, cost_sign_loss
from ..artifacts import source_identity
from ..config import Config
from ..data.chat_format import HH, ChatFormat, chat_format
from ..data.preferences import Pair, PairStats, has_splits, load_pairs, split_holdout
from ..errors import UserError
from ..models.reward_model import STATS_FILE, build_reward_model, encode, pad_right, plain_model, rewards, score_ids
from ..tracking import MetricsLogger, seed_everything
from . import checkpoint, sharding
from .common import adamw, cosine_schedule, on_cpu, save_model_folder, training_device
from .pair_packing import EncodedPair, can_pack, packed_rewards, packed_scores, row_lengths

log = logging.getLogger("direct_rlhf")


@dataclass
class PreferenceData:
    """Training and held-out pairs for one preference model, plus what the data identity is."""

    train: list[Pair]
    eval: list[Pair]
    info: dict[str, Any]   # sources and load statistics, written into run_info.json
    key: Any               # identifies the data for the stage cache


def cost_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """Harmless pairs with roles swapped (safety labels too): the more harmful response must score
    the higher cost."""
    return [replace(p, chosen=p.rejected, rejected=p.chosen, chosen_safe=p.rejected_safe, rejected_safe=p.chosen_safe)
            for p in pairs if p.subset == "harmless"]


def check_safety_labels(pairs: Sequence[Pair], source: str) -> None:
    """The cost model's classification term needs both responses' safety labels on every pair
    (`cost_pairs`' order: chosen = the more harmful). Without them its zero would mean nothing, and
    HH-style data does not say which responses are unsafe, only which is worse: so refuse, in one line."""
    missing = [i for i, p in enumerate(pairs) if p.chosen_safe is None or p.rejected_safe is None]
    if missing:
        raise UserError(f"{source}: {len(missing)} of {len(pairs)} harmless pairs lack the safety labels the cost "
                        f"model needs: fields 'chosen_safe' and 'rejected_safe' (true or false), so that a cost "
                        f"above 0 means unsafe and ppo.cost_threshold means something (docs/ppo-lagrangian.md)")
    wrong = [i for i, p in enumerate(pairs) if p.chosen_safe and not p.rejected_safe]
    if wrong:
        raise UserError(f"{source}: {len(wrong)} harmless pairs have their chosen (more harmless) response labelled "
                        f"unsafe and the rejected one safe (chosen_safe=false, rejected_safe=true); the labels or "
                        f"the order are wrong")


def safety_targets(pairs: Sequence[Pair]) -> torch.Tensor:
    """(B, 2): 1.0 where the chosen / rejected response is labelled unsafe, 0.0 where safe."""
    return torch.tensor([[float(not p.chosen_safe), float(not p.rejected_safe)] for p in pairs])


def preference_data(cfg: Config, world: Path | None, cost: bool = False, fmt: ChatFormat = HH) -> PreferenceData:
    """Load and validate the pairs a run asks for (before any model work, so mistakes surface fast),
    rendered by `fmt` (the HH transcript, or the trained model's chat template: model.chat_format).

    Sources: `reward.data` (null = the toy world's pairs_train.jsonl); held-out pairs from
    `reward.eval_data`, else the toy world's pairs_eval.jsonl, else the HF dataset's `eval_split`,
    else a seeded `eval_fraction` of a local data file.
    """
    rc = cfg.reward
    subset = "harmless" if cost else rc.subset
    if rc.data is None and world is None:
        raise ValueError("the toy world is needed when reward.data is null")
    train_src = rc.data if rc.data is not None else str(Path(world) / "pairs_train.jsonl")
    train, train_stats = load_pairs(train_src, subset, rc.split, rc.skip_invalid, fmt)
    held_stats: PairStats | None = None
    if rc.eval_data is not None or rc.data is None or has_splits(rc.data):
        eval_src = rc.eval_data or (rc.data if rc.data is not None else str(Path(world) / "pairs_eval.jsonl"))
        held, held_stats = load_pairs(eval_src, subset, rc.eval_split, rc.skip_invalid, fmt)
        eval_src = held_stats.source
    else:  # a local file and no eval file: hold out a seeded fraction
        train, held = split_holdout(train, rc.eval_fraction, cfg.seed)
        eval_src = f"{rc.eval_fraction:.0%} of {rc.data} held out (seed {cfg.seed})"
    if cost:
        train, held = cost_pairs(train), cost_pairs(held)
        check_safety_labels(train, train_stats.source)
        check_safety_labels(held, eval_src)
    info = {"train_source": train_stats.source, "eval_source": eval_src, "subset": subset, "cost_model": cost,
            "train_load": asdict(train_stats), "eval_load": asdict(held_stats) if held_stats else None,
            "n_train": len(train), "n_eval": len(held)}
    # the toy world's files are identified by the world's own key (in the stage key), not by path;
    # "bt+sign": cost models trained before the classification term are retrained, not reused
    return PreferenceData(train, held, info,
                          key=[source_identity(rc.data), source_identity(rc.eval_data), subset,
                               "bt+sign" if cost else False] + ([fmt.name] if fmt.name != "hh" else []))


# --------------------------------------------------------------------------------------------------
# The loss path (one forward over chosen and rejected together)


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_len: int) -> tuple[list[EncodedPair], int]:
    """Token ids of every (prompt+chosen, prompt+rejected); returns (encoded, n_truncated sequences)."""
    prompts = [p.prompt for p in pairs]
    chosen, n_c = encode(tokenizer, prompts, [p.chosen for p in pairs], max_len)
    rejected, n_r = encode(tokenizer, prompts, [p.rejected for p in pairs], max_len)
    return list(zip(chosen, rejected)), n_c + n_r


def pair_loss(model: torch.nn.Module, batch: Sequence[EncodedPair], pad_id: int,
              margins: torch.Tensor | None = None, center_coef: float = 0.0, packed: bool = False,
              unsafe: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BT loss of a batch of pairs, all in ONE forward pass. `packed` (see train/pair_packing.py):
    one row per pair, the shared prefix computed once; else 2B rows padded to the longest.
    `unsafe` (the cost model; (B, 2), `safety_targets`): plus Safe-RLHF's classification term on
    each side of the pair, so that unsafe responses score above 0 and safe ones below."""
    if packed:
        r_chosen, r_rejected = packed_rewards(model, batch, pad_id)  # size = (B,) each
    else:
        input_ids, mask = pad_right([c for c, _ in batch] + [r for _, r in batch], pad_id)  # size = (2B, T)
        device = next(model.parameters()).device
        scores = rewards(model, input_ids.to(device), mask.to(device))  # size = (2B,)
        r_chosen, r_rejected = scores[: len(batch)], scores[len(batch):]  # size = (B,) each
    margins = None if margins is None else margins.to(r_chosen.device)
    loss, stats = bradley_terry_loss(r_chosen, r_rejected, margin=margins, center_coef=center_coef)
    if unsafe is not None:
        unsafe = unsafe.to(r_chosen.device)
        sign_c, stats_c = cost_sign_loss(r_chosen, unsafe[:, 0])
        sign_r, stats_r = cost_sign_loss(r_rejected, unsafe[:, 1])
        loss = loss + sign_c + sign_r  # Safe-RLHF: -logsig(c_u - c_s) - logsig(s_u c_u) - logsig(s_s c_s)
        stats["sign_accuracy"] = (stats_c["sign_accuracy"] + stats_r["sign_accuracy"]) / 2
    return loss, stats


def sign_accuracy(scores: torch.Tensor, pairs: Sequence[Pair]) -> float:
    """Fraction of responses whose cost has the sign of its label (unsafe > 0, safe < 0); scores are
    `pairwise_accuracy`'s, chosen then rejected."""
    unsafe = safety_targets(pairs)  # size = (N, 2)
    sign = torch.cat([unsafe[:, 0], unsafe[:, 1]]) * 2 - 1  # size = (2N,)
    return (sign * scores.cpu() > 0).float().mean().item()


def pairwise_accuracy(model: torch.nn.Module, encoded: Sequence[EncodedPair], pairs: Sequence[Pair], pad_id: int,
                      batch_size: int, packed: bool = False) -> tuple[dict[str, float], torch.Tensor]:
    """Accuracy overall and per subset (ties count as wrong), and all scores, size = (2N,):
    chosen then rejected."""
    was_training = model.training
    model.eval()
    if packed:
        chosen, rejected = packed_scores(model, encoded, pad_id, batch_size)  # size = (N,) each
        scores = torch.cat([chosen, rejected])  # size = (2N,)
    else:
        scores = score_ids(model, [c for c, _ in encoded] + [r for _, r in encoded], pad_id, 2 * batch_size,
                           next(model.parameters()).device)
    model.train(was_training)
    win = (scores[: len(encoded)] > scores[len(encoded):]).float()  # size = (N,)
    return accuracy_table(win, [p.subset for p in pairs]), scores


def accuracy_table(win: torch.Tensor, subsets: Sequence[str | None]) -> dict[str, float]:
    """{'all': acc, '<subset>': acc, 'n': N, 'n/<subset>': n}: the numbers every report prints."""
    out: dict[str, float] = {"all": win.mean().item(), "n": len(subsets)}
    for name in sorted({s for s in subsets if s is not None}):
        idx = torch.tensor([s == name for s in subsets])
        out[name] = win[idx].mean().item()
        out[f"n/{name}"] = int(idx.sum())
    return out


def _margins(pairs: Sequence[Pair], use: bool) -> torch.Tensor | None:
    if not use or all(p.margin is None for p in pairs):
        return None
    return torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)  # size = (B,)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator,
                           group: int = 16) -> list[list[int]]:
    """Shuffled batches of similar length: padding to the batch's longest then wastes little.

    Indices are shuffled, cut into groups of `group` batches, sorted by length inside each group,
    cut into batches, and the batches shuffled, so each epoch still sees a random order.
    On the toy world this halves the padded tokens (and the step time) against plain shuffling.
    """
    order = torch.randperm(len(lengths), generator=gen).tolist()
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


# --------------------------------------------------------------------------------------------------
# The trainer


def _resume(root: Path, key: str, model, opt, sched, gen: torch.Generator, acc=None,
            loss_fn: torch.nn.Module | None = None) -> tuple[int, int, int] | None:
    """Restore the newest checkpoint made with the same inputs; (epoch, batches of it done, step) or None.
    `gen` comes back as it was at the start of that epoch, so the epoch's batches are drawn again
    alike and the done ones skipped (a checkpoint from before mid-epoch saves has no 'batch': 0).
    `loss_fn` sharded (model.strategy=fsdp): its weights and `opt`'s states are the checkpoint's
    DCP shards, resharded to this run's processes, however many saved them."""
    path = checkpoint.latest(root)
    if path is None:
        return None
    sharded = loss_fn is not None and sharding.is_sharded(loss_fn)
    # another run's (other inputs, or the other strategy's layout): start afresh, or its later steps
    # would shadow this run's
    if checkpoint.trainer_state(path).get("key") != key or (path / checkpoint.SHARDS).is_dir() != sharded:
        if acc is not None:
            acc.wait_for_everyone()
        if acc is None or acc.is_main_process:
            checkpoint.clear(root)
        if acc is not None:
            acc.wait_for_everyone()
        return None
    states, ts, rngs = checkpoint.load(path, {} if sharded else {"model": model})
    if sharded:
        with checkpoint.readable(path):
            sharding.load_models(path / checkpoint.SHARDS, {"": (loss_fn, opt)})
    else:
        opt.load_state_dict(states["opt"])
    sched.load_state_dict(states["sched"])
    rank = acc.process_index if acc is not None else 0
    checkpoint.set_rng_state(rngs[min(rank, len(rngs) - 1)])  # training draws none; kept for exactness
    gen.set_state(torch.tensor(ts["gen"], dtype=torch.uint8))
    return ts["epoch"], ts.get("batch", 0), ts["step"]


class _NoLog:
    """The metrics log of a process other than the first: only the first writes one."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _PairLoss(torch.nn.Module):
    """`pair_loss` of the reward model as a module's forward, so that torch's DistributedDataParallel
    or FSDP's root (both hook into a forward) wraps the whole of it: the packed path
    (train/pair_packing.py) calls the model's backbone and head directly, past the model's own forward."""

    def __init__(self, model: torch.nn.Module, pad_id: int, rc, packed: bool, cost: bool):
        super().__init__()
        self.model, self.pad_id, self.rc, self.packed, self.cost = model, pad_id, rc, packed, cost

    def forward(self, batch: Sequence[EncodedPair], batch_pairs: Sequence[Pair]):
        return pair_loss(self.model, batch, self.pad_id, _margins(batch_pairs, self.rc.margin), self.rc.center_coef,
                         self.packed, safety_targets(batch_pairs) if self.cost else None)


def _accumulate(loss_fn, enc: Sequence[EncodedPair], pairs: Sequence[Pair], idx: list[int], rank: int, world: int,
                micro: int) -> dict[str, torch.Tensor]:
    """Backward of this process's share of a global batch (`idx[rank::world]`), `micro` pairs a
    pass, each pass's loss weighted by its share of the global batch x the number of processes
    (DDP and FSDP average the processes' gradients, in the last pass's backward): the gradients
    then sum, over passes and processes, to those of one pass over the whole batch (every term of
    the loss is a mean over pairs). A process without pairs in a short last batch runs one pair
    weighted 0, as DDP needs every process's backward; sharded (fsdp), a forward is collective, so
    every process runs as many passes as the first, which has the most pairs. Returns the loss and
    statistics, weighted by the share of the global batch (this process's part)."""
    mine, total = idx[rank::world], {}
    parts = [mine[s:s + micro] for s in range(0, len(mine), micro)]
    passes = max(1, math.ceil(len(idx[::world]) / micro) if sharding.is_sharded(loss_fn) else len(parts))
    for k in range(passes):
        part = parts[k] if k < len(parts) else idx[:1]
        w = len(part) / len(idx) if k < len(parts) else 0.0  # 1.0 for one process in one pass: unchanged from before
        sharding.gradient_sync(loss_fn, k == passes - 1)
        loss, stats = loss_fn([enc[i] for i in part], [pairs[i] for i in part])
        (loss * (w * world)).backward()
        for name, value in (("loss", loss.detach()), *stats.items()):
            total[name] = total[name] + value.detach() * w if name in total else value.detach() * w
    return total


def _all_sum(stats: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    names = sorted(stats)
    vec = torch.stack([stats[n].float().reshape(()) for n in names]).to(device)
    dist.all_reduce(vec)
    return dict(zip(names, vec.cpu()))


def train_preference_model(cfg: Config, init: str, data: PreferenceData, out: Path, log_dir: Path, key: str,
                           progress: bool = True, stage: str = "reward") -> Path:
    """Train, evaluate on held-out pairs, and save a plain HF folder + reward_stats.json + eval.json.

    Data parallel over every process of a `torchrun` / `accelerate launch`: `reward.batch_size`
    is the global batch, each process backpropagates its share (in `reward.micro_batch_size`
    passes) and the gradients are summed over the processes before the step, so every process
    takes the same step as one process would on the whole batch. `model.strategy` (ddp or fsdp,
    train/sharding.py) spreads the model. Every process scores the held-out and statistics pairs
    itself (as long as one process alone would: no process waits on another; fsdp: with the
    weights gathered whole for it, so its forwards run no collective), so they are those of a
    one-process run; the first process alone writes the log and the folder (fsdp: gathered whole
    on it), and the checkpoints (fsdp: every process writes its shards into them)."""
    from accelerate import Accelerator

    rc, cost = cfg.reward, stage == "cost"
    sharding.init_processes(cfg.model.process_timeout_min)
    acc = Accelerator(cpu=on_cpu())
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    if rc.batch_size % world:
        raise UserError(f"reward.batch_size={rc.batch_size} is the batch of all {world} processes together and "
                        f"must divide among them: make it a multiple of {world}")
    micro = rc.micro_batch_size or rc.batch_size // world
    seed_everything(cfg.seed)  # the same on every process: the same new head, the same batches
    model, tokenizer = build_reward_model(init, cfg)
    device = acc.device if world > 1 else training_device()
    model.to(device).train()
    pad_id = tokenizer.pad_token_id
    packed = can_pack(model, rc.max_len)
    # data parallel: torch's DDP around the loss (one process: the loss as it is), or (fsdp) the loss
    # module as the root over the sharded decoder layers; the optimiser is built on what this leaves
    mc = cfg.model
    loss_fn = sharding.shard(_PairLoss(model, pad_id, rc, packed, cost), mc.strategy, mc.dtype, mc.fsdp_cpu_offload,
                             device, float32=[model.score])
    train_enc, n_trunc = encode_pairs(tokenizer, data.train, rc.max_len)
    eval_enc, n_trunc_eval = encode_pairs(tokenizer, data.eval, rc.max_len)
    load = data.info.get("train_load") or {}
    log.info("%s model: %d training pairs (%d dropped: chosen == rejected), %d held out; %d + %d sequences "
             "longer than reward.max_len=%d keep their last %d tokens", stage, len(train_enc),
             load.get("dropped_identical", 0), len(eval_enc), n_trunc, n_trunc_eval, rc.max_len, rc.max_len)
    steps_per_epoch = math.ceil(len(train_enc) / rc.batch_size)
    total = rc.epochs * steps_per_epoch
    opt = adamw(model, rc.lr, rc.weight_decay)
    sched = cosine_schedule(opt, rc.warmup_steps, total, rc.min_lr_ratio)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    held, held_sign, ckpt_root = {}, None, log_dir / "checkpoints"
    resumed = _resume(ckpt_root, key, model, opt, sched, gen, acc, loss_fn)
    first_epoch, skip, step = resumed or (0, 0, 0)
    logger = MetricsLogger(log_dir, resume_from=step if resumed else None) if main else _NoLog()
    if resumed:
        log.info("%s model: resumed in epoch %d after step %d", stage, first_epoch + 1, step)
    else:
        logger.log(0, {"n_train": len(train_enc), "n_eval": len(eval_enc), "truncated_train": n_trunc,
                       "truncated_eval": n_trunc_eval, "dropped_identical": load.get("dropped_identical", 0)})
    window: dict[str, list[float]] = {"loss": [], "accuracy": [], "margin": []}
    bar = tqdm(total=total, initial=step, desc=stage, disable=not (progress and main), dynamic_ncols=True)
    lengths = row_lengths(train_enc, packed)

    def save(epoch: int, batch: int, gen_state: torch.Tensor) -> None:
        """A checkpoint to resume from: `batch` batches of `epoch` done, `gen` as at its start; sharded
        (fsdp), every process writes its shards of the weights and optimiser states (DCP) into it."""
        rngs = checkpoint.gathered_rng_states(gather_object) if world > 1 else [checkpoint.rng_state()]
        shards = None
        if sharding.is_sharded(loss_fn):
            shards = sharding.save_models(ckpt_root / f".step-{step:06d}.shards.tmp", {"": (loss_fn, opt)}, None)
        if main:
            states = {"sched": sched.state_dict()} if shards else {"opt": opt.state_dict(), "sched": sched.state_dict()}
            checkpoint.save(ckpt_root, step, {} if shards else {"model": model}, states,
                            {"key": key, "epoch": epoch, "batch": batch, "step": step, "rng": rngs,
                             "gen": gen_state.tolist()}, world_size=world, shards=shards)
        acc.wait_for_everyone()

    for epoch in range(first_epoch, rc.epochs):
        epoch_gen = gen.get_state()
        batches = length_grouped_batches(lengths, rc.batch_size, gen)
        for k, idx in enumerate(batches):
            if epoch == first_epoch and k < skip:  # done before the checkpoint this run resumed from
                continue
            step += 1
            opt.zero_grad(set_to_none=True)
            stats = _accumulate(loss_fn, train_enc, data.train, idx, rank, world, micro)
            if world > 1:
                stats = _all_sum(stats, device)
            sharding.clip_grad_norm(loss_fn, rc.grad_clip)  # sharded: the norm over the processes' shards
            opt.step()
            sched.step()
            for name, value in stats.items():
                window.setdefault(name, []).append(value.item())
            if step % rc.log_every == 0 or step == total:
                row = {k: sum(v) / len(v) for k, v in window.items() if v}
                logger.log(step, {**row, "lr": sched.get_last_lr()[0], "elapsed_s": time.perf_counter() - start})
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
                window = {k: [] for k in window}
            if step % rc.eval_every == 0 or step == total:
                with sharding.whole_weights(loss_fn):
                    held, held_scores = pairwise_accuracy(model, eval_enc, data.eval, pad_id, rc.batch_size, packed)
                logger.log(step, {f"eval/accuracy/{k}" if k != "all" else "eval/accuracy": v
                                  for k, v in held.items() if not k.startswith("n")})
                if cost:
                    held_sign = sign_accuracy(held_scores, data.eval)
                    logger.log(step, {"eval/sign_accuracy": held_sign})
            bar.update(1)
            if rc.save_every and step % rc.save_every == 0 and k + 1 < len(batches):
                save(epoch, k + 1, epoch_gen)  # in the middle of an epoch
        if epoch + 1 < rc.epochs:  # a killed run restarts from here at the latest
            save(epoch + 1, 0, gen.get_state())
    bar.close()
    train_s = time.perf_counter() - start
    model = plain_model(model).eval()  # LoRA merged (ddp only: fsdp trains every weight)
    # Statistics PPO normalises with: rewards of both chosen and rejected responses on (a seeded sample
    # of) the training set; 1000 pairs pin mean and std to about 3% of std, at a fraction of a full pass.
    sample = sorted(torch.randperm(len(train_enc), generator=gen)[: rc.stats_pairs or None].tolist())
    with sharding.whole_weights(loss_fn):
        train_acc, scores = pairwise_accuracy(model, [train_enc[i] for i in sample], [data.train[i] for i in sample],
                                              pad_id, rc.batch_size, packed)
    reward_stats = {"mean": scores.mean().item(), "std": scores.std().item(), "n": scores.numel(),
                    "max_len": rc.max_len, "kind": stage,
                    "higher_is": "more harmful" if stage == "cost" else "more preferred",
                    **({"zero": "above 0 = unsafe, below 0 = safe (trained with safety labels)"} if cost else {})}
    eval_json = {"heldout": held, "train": train_acc, "train_s": train_s,
                 "truncated": {"train": n_trunc, "eval": n_trunc_eval}}
    if cost:  # does the sign say unsafe / safe, as ppo.cost_threshold assumes
        eval_json["sign_accuracy"] = {"heldout": held_sign,
                                      "train": sign_accuracy(scores, [data.train[i] for i in sample])}
    logger.log(step, {"train/accuracy": train_acc["all"], "reward_mean": reward_stats["mean"],
                      "reward_std": reward_stats["std"], "train_s": train_s})
    logger.close()
    if sharding.is_sharded(loss_fn):
        model = sharding.unsharded(loss_fn, "model")  # every process takes part; the whole model on the first only
    if main:
        info = {"stage": stage, "key": key, "seed": cfg.seed, "init": init, "config": cfg.section_dict("reward"),
                "data": data.info, "steps": total, "train_s": train_s, "wall_s": time.perf_counter() - start,
                "n_params": sum(p.numel() for p in model.parameters()), **({"processes": world} if world > 1 else {})}
        save_model_folder(out, model, tokenizer, info, extra={STATS_FILE: reward_stats, "eval.json": eval_json})
        shutil.rmtree(ckpt_root, ignore_errors=True)  # only once the model is saved: a kill while scoring resumes
    acc.wait_for_everyone()  # the folder is there when any process returns it
    return Path(out)


# --------------------------------------------------------------------------------------------------
# Evaluating a saved folder (direct-rlhf reward --eval-only)


def evaluate_folder(model_dir: str | Path, data: str, subset: str = "all", split: str = "test",
                    skip_invalid: bool = False, chat_format_name: str = "hh") -> dict[str, float]:
    """Pairwise accuracy of a saved reward model on a pair file, overall and per subset, the pairs
    rendered in `chat_format_name` (model.chat_format; a template is the reward model's own)."""
    from ..models.reward_model import RewardScorer

    from ..models.loading import load_tokenizer

    fmt = HH if chat_format_name == "hh" else chat_format(chat_format_name, load_tokenizer(model_dir), str(model_dir))
    pairs, _ = load_pairs(data, subset, split, skip_invalid, fmt)  # type: ignore[arg-type]
    scorer = RewardScorer(model_dir, device=str(training_device()))
    prompts = [p.prompt for p in pairs]
    chosen = scorer.score(prompts, [p.chosen for p in pairs])  # size = (N,)
    rejected = scorer.score(prompts, [p.rejected for p in pairs])  # size = (N,)
    return accuracy_table((chosen > rejected).float(), [p.subset for p in pairs])


def format_accuracy(table: dict[str, float]) -> str:
    """A small fixed-width table: subset, pairs, accuracy."""
    names = ["all"] + sorted(k for k in table if k not in ("all", "n") and not k.startswith("n/"))
    lines = [f"{'subset':<10} {'pairs':>6} {'accuracy':>9}"]
    for name in names:
        n = table["n"] if name == "all" else table[f"n/{name}"]
        lines.append(f"{name:<10} {int(n):>6} {table[name]:>9.3f}")
    return "\n".join(lines)
