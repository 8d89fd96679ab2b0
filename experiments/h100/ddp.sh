#!/usr/bin/env bash
# On a multi-GPU machine (2, 4 or 8 GPUs): pretraining scaling with
# torchrun, 1 -> 2 (-> 4 -> 8) GPUs, ML-1M packed rows of 4096 tokens, 100m preset, bf16, flex
# attention, torch.compile, 4 rows per GPU (weak scaling), DDP. Appends to pretrain_ddp.json in
# $OUT (when set) or benchmarks/results/, and prints a markdown table.
#   bash experiments/h100/ddp.sh                          # W = 1,2,4,8 (those the machine has)
#   WORLDS=1,2 PARALLEL=fsdp PRESET=300m ROWS=2 bash experiments/h100/ddp.sh
# Each W compiles the model once (1-2 min at 100m); past 10 minutes split the call: WORLDS=1,2 then WORLDS=1,4,8.
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
[ -d .wheels ] && . experiments/h100/setup.sh
RESULTS=${OUT:-benchmarks/results}
python3 benchmarks/bench_ddp.py --spec ${SPEC:-specs/ml-1m.toml} --preset ${PRESET:-100m} --parallel ${PARALLEL:-ddp} \
  --rows-per-gpu ${ROWS:-4} --steps ${STEPS:-60} --worlds ${WORLDS:-1,2,4,8} --out $RESULTS/pretrain_ddp.json
grep -h "error\|Error" /tmp/lumctl-bench-ddp/w*.log | head -n 20 || true
if [ -n "${OUT:-}" ]; then mkdir -p $OUT/logs && cp /tmp/lumctl-bench-ddp/w*.log /tmp/lumctl-bench-ddp/w*.toml $OUT/logs/; fi
