#!/usr/bin/env bash
# One device call: 100M-preset throughput alone on the GPU, then the item-only baselines at 50 epochs.
. benchmarks/gpu_setup.sh
python3 benchmarks/run_variants.py specs/ml-1m.toml benchmarks/variants/throughput.json --only tp-100m --store-root /tmp/stores --out $OUT/throughput.json
grep -h "median\|test hr\|pretrain: lum" $OUT/throughput.logs/*.log
for b in sasrec hstu hstu-large; do
  python3 benchmarks/run_variants.py specs/ml-1m-$b.toml benchmarks/variants/e50.json --store-root /tmp/stores --out $OUT/ml1m-$b.json &
done
wait
grep -h "test hr\|median" $OUT/*.logs/*.log
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
