#!/usr/bin/env bash
# One device call: 100M-preset throughput alone on the GPU, then the item-only baselines
# (50 epochs) and seed repeats of LUM with/without conditions, in parallel.
. benchmarks/gpu_setup.sh
python3 benchmarks/run_variants.py specs/ml-1m.toml benchmarks/variants/throughput.json --only tp-100m --store-root /tmp/stores --out $OUT/throughput.json
grep -h "median\|test hr\|pretrain: lum" $OUT/throughput.logs/*.log
for b in sasrec hstu hstu-large; do
  python3 benchmarks/run_variants.py specs/ml-1m-$b.toml benchmarks/variants/e50.json --store-root /tmp/stores --out $OUT/ml1m-$b.json &
done
python3 benchmarks/run_variants.py specs/ml-1m.toml benchmarks/variants/seeds.json --only cond-s1,cond-s2,nocond-s1,nocond-s2 --parallel 4 --store-root /tmp/stores --out $OUT/ml1m-seeds.json &
python3 benchmarks/run_variants.py specs/ml-100k.toml benchmarks/variants/seeds.json --only cond-r5g5-s0,cond-r5g5-s1,nocond-s1 --parallel 3 --store-root /tmp/stores --out $OUT/ml100k-seeds.json &
wait
grep -h "test hr\|median" $OUT/*.logs/*.log
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
