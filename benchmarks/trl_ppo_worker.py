"""TRL's PPOTrainer side of `ppo_vs_trl.py`. Runs inside the benchmark's own virtual env
(trl==1.12.0, the last release with `trl.experimental.ppo`); it imports nothing from direct_rlhf
(only `peak_memory` from ppo_step.py beside it, which needs torch alone). On a machine with a GPU
it runs there, as our side does.

TRL's `train()` is one loop, so the time split is taken by wrapping the module-level helpers it
calls: `batch_generation` (generation), `get_reward` on the reward model (scoring), `get_reward` on
the value model and `forward` under no_grad (experience: reference log-probs and values); the rest
of each update (PPO epochs, GAE, bookkeeping) is training. Step times come from `on_step_end`.

    python trl_ppo_worker.py --base DIR --reward DIR --prompts FILE --steps 3 --warmup 1 --out FILE
                             [--bf16] [--attn eager]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import defaultdict

import torch
from ppo_step import peak_memory  # beside this file


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8, help="rows per training forward (gradient accumulation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (TrainingArguments.bf16)")
    p.add_argument("--attn", default=None, help="attn_implementation of all four models (default: transformers')")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.bf16:  # TRL's PPOTrainer builds its own Accelerator, which takes mixed precision from the
        # environment (`accelerate launch --mixed_precision bf16`), not from PPOConfig.bf16
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"

    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as T

    tok = AutoTokenizer.from_pretrained(a.base, padding_side="left")
    n = a.batch * (a.steps + a.warmup)
    prompts = [json.loads(line)["prompt"] for line in open(a.prompts, encoding="utf-8")][:n]
    ds = Dataset.from_dict({"input_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in prompts]})
    attn = {"attn_implementation": a.attn} if a.attn else {}
    policy = AutoModelForCausalLM.from_pretrained(a.base, **attn)
    ref = AutoModelForCausalLM.from_pretrained(a.base, **attn)
    value = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, **attn)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, **attn)
    cfg = PPOConfig(
        output_dir=a.workdir, per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.batch // a.micro_batch,
        num_mini_batches=1, num_ppo_epochs=a.epochs, response_length=a.new_tokens, temperature=1.0,
        local_rollout_forward_batch_size=a.batch, total_episodes=n, num_sample_generations=0,
        stop_token="eos", kl_estimator="k1", learning_rate=1e-5, seed=a.seed, report_to="none",
        save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=a.bf16,
    )

    spent: dict[str, float] = defaultdict(float)
    generated: list[int] = []
    train_tokens = [0]  # token positions the PPO epochs push through policy + value (padding included)

    def now() -> float:  # after the GPU's queued work, so that each phase's kernels count in that phase
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def clock(bucket: str):
        t = now()
        try:
            yield
        finally:
            spent[bucket] += now() - t

    _generate, _get_reward, _forward = T.batch_generation, T.get_reward, T.forward

    def batch_generation(model, queries, *args, **kw):
        with clock("generate"):
            out = _generate(model, queries, *args, **kw)
        generated.append(queries.shape[0] * (out[0].shape[1] - queries.shape[1]))
        return out

    def get_reward(model, *args, **kw):
        with clock("score" if model is reward else "experience"):  # else: the value model
            return _get_reward(model, *args, **kw)

    def forward(model, query_responses, *args, **kw):
        if torch.is_grad_enabled():  # a PPO-epoch forward: counted as training, the remainder of the step
            train_tokens[0] += query_responses.numel()
            return _forward(model, query_responses, *args, **kw)
        with clock("experience"):  # the reference model's forward
            return _forward(model, query_responses, *args, **kw)

    T.batch_generation, T.get_reward, T.forward = batch_generation, get_reward, forward
    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            self.t = now()
            spent.clear()

        def on_step_end(self, *args, **kw):
            t = now()
            step = t - self.t
            known = spent["generate"] + spent["score"] + spent["experience"]
            rows.append({"step_s": step, "generate_s": spent["generate"], "score_s": spent["score"],
                         "experience_s": spent["experience"], "train_s": step - known,
                         "generated_tokens": generated.pop() if generated else 0,
                         "train_tokens": train_tokens[0]})
            spent.clear()
            train_tokens[0] = 0
            self.t = t

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(a.batch)),
                         callbacks=[StepTimer()])
    trainer.train()
    timed_rows = rows[a.warmup:]
    import trl

    json.dump({"rows": timed_rows, **peak_memory(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "trl": trl.__version__,
               "mixed_precision": trainer.accelerator.mixed_precision,
               "attn_implementation": policy.config._attn_implementation},
              open(a.out, "w"), indent=2)


if __name__ == "__main__":
    main()
