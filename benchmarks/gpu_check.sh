#!/usr/bin/env bash
# The GPU check, one short run (under 10 minutes) on a machine with a CUDA GPU:
#   tests       the PPO, reward-model and SFT tests with the GPU visible, so that every trainer in
#               them runs there: packed rows against padded ones, LoRA, checkpointing, bf16, resume;
#   bench-bf16  ours against TRL's PPOTrainer on the GPU (benchmarks/ppo_vs_trl.py), bf16 mixed
#               precision, at the two sizes and hidden 1024 x 12 layers;
#   bench-fp32  the same in fp32 at the two sizes;
#   fsdp        (not run by default: STAGES=fsdp) the FSDP2 PPO tests (tests/test_ppo_sharding.py) on the
#               GPUs over NCCL, one process per GPU (DIRECT_RLHF_TEST_GPUS): with one GPU, each
#               sharded run is a group of one against the unsharded run, and the checkpoint resumes;
#   budget      (not run by default) our step alone at 512 x 6 in bf16, 8-row micro-batches against
#               32 rows within 4096 token positions (ppo.micro_batch_tokens): fewer launches per pass
#               (BUDGET_HIDDEN / BUDGET_LAYERS change the size, e.g. 64 / 2 for a dry run on a CPU).
# It needs a python with CUDA torch, our dependencies, pytest and trl==1.12.0 importable
# (PYTHON, default python3; src/ is put on PYTHONPATH). Logs and JSON go to OUTDIR; STAGES picks
# stages (default: all three).
#
#     benchmarks/gpu_check.sh OUTDIR
#
# On a machine with CUDA torch but no registry, bring the rest as wheels and install them first, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0 \
#     trl==1.12.0 datasets==5.2.0 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19
#   (there) pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site ...
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $py -c 'import sys, torch, transformers, peft, accelerate, trl, datasets
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__,
      "trl", trl.__version__, "datasets", datasets.__version__)'
} 2>&1 | tee "$out/versions.txt"

stage() {  # stage NAME SECONDS COMMAND...: its output in OUTDIR/NAME.log, its tail here
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $?, $((SECONDS - t0)) s"
  grep -v -i -E "warn|MISSING|newly initialized|Writing model|^- |^Notes:|^$" "$out/$name.log" | tail -n 16
}

for s in ${STAGES:-tests bench-bf16 bench-fp32}; do
  case $s in
    tests) stage tests 200 $py -m pytest -q -rf -p no:cacheprovider tests/test_ppo.py tests/test_reward.py \
             tests/test_sft.py ;;
    fsdp) stage fsdp 300 env DIRECT_RLHF_TEST_GPUS="$(nvidia-smi -L | wc -l)" $py -m pytest -q -rf \
             -p no:cacheprovider tests/test_ppo_sharding.py ;;
    bench-bf16) stage bench-bf16 230 $py benchmarks/ppo_vs_trl.py --trl-python "$py" --bf16 --rounds 1 \
             --steps 4 --warmup 2 --sizes 128x4,512x6,1024x12 --out "$out/ppo_vs_trl-gpu-bf16.json" ;;
    bench-fp32) stage bench-fp32 170 $py benchmarks/ppo_vs_trl.py --trl-python "$py" --rounds 1 --steps 4 \
             --warmup 2 --sizes 128x4,512x6 --out "$out/ppo_vs_trl-gpu.json" ;;
    budget) stage budget-rows8 75 $py benchmarks/ppo_step.py --hidden ${BUDGET_HIDDEN:-512} --layers ${BUDGET_LAYERS:-6} --steps 4 --warmup 1 \
              --set ppo.bf16=true ppo.micro_batch_size=8 --out "$out/budget-rows8.json"
            stage budget-tok4096 75 $py benchmarks/ppo_step.py --hidden ${BUDGET_HIDDEN:-512} --layers ${BUDGET_LAYERS:-6} --steps 4 --warmup 1 \
              --set ppo.bf16=true ppo.micro_batch_size=32 ppo.micro_batch_tokens=4096 --out "$out/budget-tok4096.json" ;;
    *) echo "unknown stage $s" ;;
  esac
done
