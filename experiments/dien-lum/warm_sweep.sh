#!/usr/bin/env bash
# Warm-start variants of DIEN + LUM on ML-1M (benchmarks/results/fuse_ml1m_dien/README.md): every
# seed a process, side by side on one GPU machine. Seed k warm-starts from the base DIEN's seed k.
# Carry .wheels, .data, the LUM (LUM=folder with pretrain/ + query/) and the base DIEN fuse store's
# final/ and seeds/ (BASE).
set -u
. experiments/h100/setup.sh
export OMP_NUM_THREADS=1
LUM=${LUM:-.lumcarry/ml1m} BASE=${BASE:-.lumcarry/base/dien-fuse} OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/logs
python3 -m lumctl tokenize specs/ml-1m-ctr-gpu.toml 2>&1 | tail -1
D='"backbone":"dien","lum":"direct+match"'
run() { for s in 0 1 2; do
  python3 experiments/dien-lum/dien_lum_sweep.py "$1" "$2" --lum "$LUM" --seeds $s --log "$OUT/sweep.log" > "/tmp/logs/$1-$s.log" 2>&1 &
done; }
run dien-warm "{\"fuse\":{$D},\"warm\":\"$BASE/final\"}"
run dien-warm-freeze-base "{\"fuse\":{$D},\"warm\":\"$BASE/final\",\"freeze\":\"base\"}"
run dien-warm-freeze-backbone "{\"fuse\":{$D},\"warm\":\"$BASE/final\",\"freeze\":\"backbone\"}"
run dien-cold "{\"fuse\":{$D}}"
wait
tar czf "$OUT/logs.tgz" -C /tmp logs
sort "$OUT/sweep.log"
