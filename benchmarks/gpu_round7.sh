#!/usr/bin/env bash
# One device call (session 2): bias-gather backward check, then the ML-1M baselines (SASRec, HSTU,
# HSTU-large; 3 seeds, validation every 5 epochs) and the ML-100K HSTU / HSTU-large seeds, in parallel.
. benchmarks/gpu_setup.sh
export OMP_NUM_THREADS=1
python3 benchmarks/bench_gather.py
S=/tmp/stores
rv() { python3 benchmarks/run_variants.py "$@" --store-root $S; }
(
for b in sasrec hstu hstu-large; do rv specs/ml-1m-$b.toml benchmarks/variants/seeds3-e5.json --parallel 3 --out $OUT/ml1m-$b.json & done
rv specs/ml-100k.toml benchmarks/variants/baselines-ml100k.json --only hstu-s0,hstu-s1,hstu-s2,hstu-large-s0,hstu-large-s1,hstu-large-s2 --parallel 6 --out $OUT/ml100k-hstu.json &
wait
) &
job=$!; for i in $(seq 480); do kill -0 $job 2>/dev/null || break; sleep 1; done; echo "--- after $i s"
for f in $OUT/*.json; do python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
for r in d['results']: t=r.get('metrics',{}).get('test',{}); print(sys.argv[1].split('/')[-1], r['name'], r['returncode'], r['seconds'], t.get('hr@10'), t.get('ndcg@10'))" $f; done
grep -h "step .* valid" $OUT/*.logs/*.log | tail -n 0
for l in $OUT/*.logs/*.log; do echo "$l $(grep -c valid $l) $(grep 'valid' $l | tail -n 1 | cut -c1-60)"; done
bash benchmarks/collect_stores.sh $S $OUT/stores.tgz
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
