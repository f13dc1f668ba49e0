"""Reward-model training step: packed pairs (shared prefix once) against two rows per pair.

Same model (the toy size, built from config, offline), same batches (the toy world's training
pairs, length-grouped like the trainer does), same optimiser; the two paths alternate batch by
batch so machine noise hits both alike. Reports the median seconds per step of each, their ratio,
and the tokens each path puts through the model.

    .venv/bin/python benchmarks/reward_packing.py [--steps 40] [--batch-size 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ppo_step import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per path (after 3 warm-up steps each)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from direct_rlhf.config import WorldConfig, load_config
    from direct_rlhf.data.preferences import pairs_from_rows
    from direct_rlhf.data.toyworld.generate import FILES, build as world_files
    from direct_rlhf.models.reward_model import build_reward_model
    from direct_rlhf.train.pair_packing import packed_len, row_lengths
    from direct_rlhf.train.reward import encode_pairs, length_grouped_batches, pair_loss

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base, _, _ = build(Path(tmp), 128, 4)
        cfg = load_config()
        model, tok = build_reward_model(str(base), cfg)
    pairs, _ = pairs_from_rows(world_files(WorldConfig(n_pairs=4000))[FILES["pairs_train"]](), "toy")
    enc, _ = encode_pairs(tok, pairs, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {"packed": [], "two_rows": []}
    tokens = {"packed": 0, "two_rows": 0}
    plans = {name: length_grouped_batches(row_lengths(enc, name == "packed"), args.batch_size,
                                          torch.Generator().manual_seed(0)) for name in times}
    for i in range(args.steps + 3):
        for name in (("packed", "two_rows") if i % 2 == 0 else ("two_rows", "packed")):
            batch = [enc[j] for j in plans[name][i]]
            t = time.perf_counter()
            loss, _ = pair_loss(model, batch, tok.pad_token_id, packed=name == "packed")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 3:
                times[name].append(time.perf_counter() - t)
                tokens[name] += (sum(packed_len(p) for p in batch) if name == "packed"
                                 else sum(len(c) + len(r) for c, r in batch))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"steps": args.steps, "batch_size": args.batch_size, "median_s": med,
              "time_ratio": med["packed"] / med["two_rows"],
              "real_tokens_per_step": {k: v / args.steps for k, v in tokens.items()},
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"packed   {med['packed'] * 1e3:7.1f} ms/step  {tokens['packed'] / args.steps:7.0f} tokens")
    print(f"two rows {med['two_rows'] * 1e3:7.1f} ms/step  {tokens['two_rows'] / args.steps:7.0f} tokens")
    print(f"ratio packed/two rows: time {result['time_ratio']:.2f}, tokens "
          f"{tokens['packed'] / tokens['two_rows']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
