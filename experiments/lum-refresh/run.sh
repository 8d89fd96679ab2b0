#!/usr/bin/env bash
# The refreshed-LUM comparison of benchmarks/results/fuse_ml1m_refresh/README.md on one GPU machine:
# refresh the LUM of specs/ml-1m-ctr-gpu.toml on each user's train part (specs/ml-1m-ctr-gpu-refresh.toml),
# answer every snapshot with both LUMs, then train the +LUM rows side by side, one process per seed.
# Carry .wheels, .data, the base LUM (LUM=folder with pretrain/final) and the base DIEN checkpoints of
# seeds 0-2 (BASE/dien, BASE/dien-s1, BASE/dien-s2) for the warm starts.
set -u
. experiments/h100/setup.sh
export OMP_NUM_THREADS=1
LUM=${LUM:-.lumcarry/ml1m} BASE=${BASE:-.lumcarry/base} OUT=${OUT:-out} BUDGET=${BUDGET:-560}
DEADLINE=$((SECONDS + BUDGET))
mkdir -p "$OUT" /tmp/pred
python3 -m lumctl tokenize specs/ml-1m-ctr-gpu.toml 2>&1 | tail -1
R=specs/ml-1m-ctr-gpu-refresh.toml
for stage in tokenize pack pretrain; do LUM_BASE=$LUM/pretrain/final python3 -m lumctl $stage $R 2>&1 | grep -v "━" | tail -3; done
tar cf "$OUT/refresh_pretrain.tar" --exclude=checkpoints stores/ml-1m-ctr-gpu-refresh/pretrain
python3 experiments/lum-refresh/refresh_lum.py answers --base "$LUM/pretrain/final" \
  --refresh stores/ml-1m-ctr-gpu-refresh/pretrain/final --out /tmp/answers.npz 2>&1 | grep -v "━"
fuse() {  # name, variant JSON, seed
  timeout $((DEADLINE - SECONDS)) python3 experiments/lum-refresh/refresh_lum.py fuse "$1" "$2" --seed "$3" \
    --answers /tmp/answers.npz --log "$OUT/fuse.log" --pred "/tmp/pred/$1-s$3.npz" > "/tmp/pred/$1-s$3.log" 2>&1 &
}
WARM=("$BASE/dien" "$BASE/dien-s1" "$BASE/dien-s2")
for s in 0 1 2; do
  fuse dien-refresh '{"fuse":{"backbone":"dien"}}' $s
  fuse dien-refresh-warm "{\"fuse\":{\"backbone\":\"dien\"},\"warm\":\"${WARM[$s]}\"}" $s
done
for b in dnn din sim; do for s in 0 1 2; do fuse $b-refresh "{\"fuse\":{\"backbone\":\"$b\"}}" $s; done; done
fuse dien-base-lum '{"fuse":{"backbone":"dien"},"src":"base"}' 0
wait
tar cf "$OUT/preds.tar" -C /tmp pred
sort "$OUT/fuse.log"
