#!/usr/bin/env bash
# The DIEN + LUM sweep of benchmarks/results/fuse_ml1m_dien/README.md: every variant a process, side by
# side on one GPU machine (DIEN's step loop is launch-bound, so they share the GPU well).
# Carry .wheels, .data and the LUM (LUM=folder with pretrain/ + query/; BASE=a base DIEN fuse checkpoint).
set -u
. experiments/h100/setup.sh
export OMP_NUM_THREADS=1
LUM=${LUM:-.lumcarry/ml1m} BASE=${BASE:-.lumcarry/base/dien} OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m lumctl tokenize specs/ml-1m-ctr-gpu.toml 2>&1 | tail -1
D='"backbone":"dien","lum":"direct+match"'
run() { python3 experiments/dien-lum/dien_lum_sweep.py "$1" "$2" --lum "$LUM" > "$OUT/$1.log" 2>&1 & }
run dien-q6 "{\"fuse\":{$D}}"
run dien-drop5 "{\"fuse\":{$D},\"drop\":0.5}"
run dien-drop3 "{\"fuse\":{$D},\"drop\":0.3}"
run dien-q1-drop5 "{\"fuse\":{$D},\"drop\":0.5,\"q\":\"q1\"}"
run dien-warm "{\"fuse\":{$D},\"warm\":\"$BASE\"}"
run dien-lr1 "{\"fuse\":{$D,\"lr\":0.001,\"epochs\":12}}"
run dien-pat2 "{\"fuse\":{$D,\"patience\":2,\"epochs\":10}}"
run dien-warm-drop5 "{\"fuse\":{$D},\"warm\":\"$BASE\",\"drop\":0.5}"
wait
grep -h "##" "$OUT"/*.log
