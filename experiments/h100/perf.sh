#!/usr/bin/env bash
# On a GPU machine: packing vs per-user padding (training pass, 19m LUM,
# ML-1M users 1-2999), and serving latency, LUM Step 3 vs end-to-end HSTU, on the GPU and on the
# host's CPU. Expected wall time ~3-4 min (each step has its own timeout). Run from the repo root:
#   OUT=<results folder> bash experiments/h100/perf.sh
. experiments/h100/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$SECONDS
timeout 150 python3 benchmarks/bench_packing.py --device cuda --preset 19m \
    --ratings $LUMCTL_DATA/ml-1m/ratings.users-1-2999.dat.gz --rows 4 --seq-len 4096 --max-items 200 \
    --warmup 3 --passes 2 --out $OUT/packing.json 2>&1 | tee $OUT/packing.log
echo "--- packing done after $((SECONDS - t0)) s"
# long-tailed histories: up to 2000 events a user (padding to the longest user costs far more)
[ "${LONG_TAIL:-1}" = 1 ] && timeout 100 python3 benchmarks/bench_packing.py --device cuda --preset 19m \
    --ratings $LUMCTL_DATA/ml-1m/ratings.users-1-2999.dat.gz --rows 4 --seq-len 4096 --max-items 2000 \
    --warmup 2 --passes 1 --out $OUT/packing.json 2>&1 | tee $OUT/packing_long.log
echo "--- long-tail packing done after $((SECONDS - t0)) s"
timeout 120 python3 benchmarks/bench_serving.py --device cuda --sizes 19m,100m,300m,1b \
    --lengths 256,512,1024,2048,4096 --ref-len 1024 --requests 200 --warmup 20 \
    --out $OUT/serving_gpu.json 2>&1 | tee $OUT/serving_gpu.log
echo "--- serving (GPU) done after $((SECONDS - t0)) s"
[ "${CPU_SERVING:-1}" = 1 ] && timeout 75 python3 benchmarks/bench_serving.py --device cpu --sizes 19m,100m \
    --lengths 256,512,1024 --ref-len 1024 --requests 30 --warmup 3 \
    --out $OUT/serving_cpu.json 2>&1 | tee $OUT/serving_cpu.log
echo "--- serving (CPU) done after $((SECONDS - t0)) s"
