#!/usr/bin/env bash
# One device call (session 2): HSTU-large on ML-1M (3 seeds, validation every 5 epochs) and the
# S3-Rec Beauty table (LUM item-only, SASRec, HSTU; 3 seeds), in parallel.
. benchmarks/gpu_setup.sh
export OMP_NUM_THREADS=1
S=/tmp/stores
rv() { python3 benchmarks/run_variants.py "$@" --store-root $S; }
(
rv specs/ml-1m-hstu-large.toml benchmarks/variants/seeds3-e5.json --parallel 3 --out $OUT/ml1m-hstu-large.json &
rv specs/beauty.toml benchmarks/variants/seeds3.json --parallel 3 --out $OUT/beauty-lum.json &
rv specs/beauty.toml benchmarks/variants/baselines-beauty.json --only sasrec-s0,sasrec-s1,sasrec-s2,hstu-s0,hstu-s1,hstu-s2 --parallel 3 --out $OUT/beauty-baselines.json &
wait
) &
job=$!; for i in $(seq 430); do kill -0 $job 2>/dev/null || break; sleep 1; done; echo "--- after $i s"
for l in $OUT/*.logs/*.log; do echo "$l $(grep -c 'valid' $l) | $(grep 'valid' $l | tail -n 1 | cut -c1-70)"; done
bash benchmarks/collect_stores.sh $S $OUT/stores.tgz
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
