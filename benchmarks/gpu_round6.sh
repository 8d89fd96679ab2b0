#!/usr/bin/env bash
# One device call (session 2): the retrieval table, 3 seeds each, ML-1M and ML-100K —
# SASRec, HSTU, HSTU-large (generative-recommenders' ML-1M recipe) and LUM (the dataset's spec).
. benchmarks/gpu_setup.sh
export OMP_NUM_THREADS=1
S=/tmp/stores
rv() { python3 benchmarks/run_variants.py "$@" --store-root $S; }
(
rv specs/ml-1m.toml benchmarks/variants/seeds3.json --parallel 3 --out $OUT/ml1m-lum.json &
for b in sasrec hstu hstu-large; do rv specs/ml-1m-$b.toml benchmarks/variants/seeds3.json --parallel 3 --out $OUT/ml1m-$b.json & done
rv specs/ml-100k.toml benchmarks/variants/seeds3.json --parallel 3 --out $OUT/ml100k-lum.json &
rv specs/ml-100k.toml benchmarks/variants/baselines-ml100k.json --parallel 3 --out $OUT/ml100k-baselines.json &
wait
) &
job=$!; for i in $(seq 540); do kill -0 $job 2>/dev/null || break; sleep 1; done; echo "--- after $i s"
for f in $OUT/*.json; do python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
for r in d['results']: t=r.get('metrics',{}).get('test',{}); print(sys.argv[1].split('/')[-1], r['name'], r['returncode'], r['seconds'], t.get('hr@10'), t.get('ndcg@10'))" $f; done
bash benchmarks/collect_stores.sh $S $OUT/stores.tgz
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
