"""Peak memory of taking PPO's old log-probs from generation: step by step (`TokenLogprobs`, what
`rollout/hf_generate.py` does) against keeping every step's logits (`output_logits=True`, what it
did before), on a one-layer model with a large vocabulary, where the logits dominate memory.
Each variant runs in a fresh process; peak RSS is the process's. glibc's allocator keeps freed
(rows, vocabulary) buffers mapped, which inflates the step-by-step peak; `MALLOC_MMAP_THRESHOLD_=1048576`
in the environment hands them back (recorded in the results as `malloc_mmap_threshold`).

    .venv/bin/python benchmarks/logprob_memory.py [--vocab 128256 --rows 64 --tokens 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def child(mode: str, vocab: int, rows: int, tokens: int) -> dict:
    from transformers import LogitsProcessorList, MistralConfig, MistralForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from direct_rlhf.rollout.hf_generate import TokenLogprobs

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    prompt = torch.randint(3, vocab, (rows, 8))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, top_k=0, pad_token_id=0)
    t = time.perf_counter()
    with torch.no_grad():
        if mode == "step_by_step":
            rec = TokenLogprobs(1.0)
            seq = model.generate(prompt, logits_processor=LogitsProcessorList([rec]), **kw)
            lp = rec.finish(seq[:, prompt.shape[1]:])
        else:
            out = model.generate(prompt, return_dict_in_generate=True, output_logits=True, **kw)
            new = out.sequences[:, prompt.shape[1]:]
            lp = torch.stack([torch.log_softmax(step.float(), -1).gather(1, new[:, i:i + 1]).squeeze(1)
                              for i, step in enumerate(out.logits)], 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": time.perf_counter() - t, "shape": list(lp.shape),
            "rss_before_generate_mib": base_rss, "peak_rss_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out")
    p.add_argument("--child", choices=("step_by_step", "output_logits"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.vocab, a.rows, a.tokens)))
        return
    res = {"vocab": a.vocab, "rows": a.rows, "tokens": a.tokens, "date": time.strftime("%Y-%m-%d"),
           "threads": torch.get_num_threads(),
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "runs": []}
    for mode in ("step_by_step", "output_logits"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--vocab", str(a.vocab), "--rows",
                              str(a.rows), "--tokens", str(a.tokens)], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res["runs"].append(r)
        print(f"{mode:<14} peak RSS {r['peak_rss_mib']:8.0f} MiB (before generate {r['rss_before_generate_mib']:.0f})"
              f"   {r['seconds']:.1f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
