"""Shared fixtures. Everything is offline and CPU: tiny worlds, tiny models built from a config."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from direct_rlhf.config import WorldConfig  # noqa: E402

def torchrun(nproc: int, args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node NPROC ARGS` (--standalone: a free
    port, held by torchrun itself), run as `run_as_group` runs it."""
    return run_as_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                         *args], env, timeout)


def run_as_group(cmd: list[str], env: dict[str, str] | None, timeout: int) -> subprocess.CompletedProcess:
    """`cmd` in a process group of its own: past `timeout` seconds the whole group is killed, torchrun's
    workers with it (killing the launcher alone left a hung run's workers behind), and the result
    says so in its stderr with exit status -9."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return subprocess.CompletedProcess(cmd, -9, out, f"{err}\n{cmd[0]}: killed after {timeout} s")
    if proc.returncode:  # each process's own error at the end, where a test's message (the tail) shows it
        errors = [line for line in err.splitlines() if re.match(r"(\[rank\d+\]: )?\w*(Error|Exception|Exit)\b", line)]
        err += "\nthe processes' errors:\n" + "\n".join(errors[-8:])
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# A world small enough to generate in well under a second, big enough to hold every kind of record.
SMALL_WORLD = WorldConfig(n_dialogues=300, n_pairs=200, n_ppo_prompts=64, n_mc_per_task=8, n_redteam=20,
                          n_conversation=20)

# Overrides that make every stage run in seconds (tests only; the demo uses the real recipe).
MICRO = ["world.n_dialogues=300", "world.n_pairs=200", "world.n_ppo_prompts=64", "world.n_mc_per_task=8",
         "world.n_redteam=20", "world.n_conversation=20", "model.vocab_size=400", "model.hidden_size=32",
         "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=64",
         "pretrain.steps=60", "pretrain.batch_size=8", "pretrain.seq_len=64", "pretrain.log_every=5",
         "pretrain.warmup_steps=5",
         # toy.yaml's balance guard off: PPO tests test PPO (the guard: tests/test_balance_guard.py)
         "ppo.select=last", "ppo.eval_every=0"]


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    from direct_rlhf.data.toyworld.generate import write_world

    out = tmp_path_factory.mktemp("world") / "world"
    write_world(SMALL_WORLD, out)
    return out
