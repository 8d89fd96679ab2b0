#!/usr/bin/env bash
# One device call: GPU tests, then LUM and baseline quality runs in parallel.
. benchmarks/gpu_setup.sh
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > $OUT/gputest.txt 2>&1; tail -n 3 $OUT/gputest.txt
python3 benchmarks/run_variants.py specs/ml-1m.toml benchmarks/variants/ml1m.json --only ${ML1M:-r5g10,r5g5,r5g10-mixr} --parallel 3 --store-root /tmp/stores --out $OUT/ml1m.json &
python3 benchmarks/run_variants.py specs/ml-100k.toml benchmarks/variants/ml100k.json --only ${ML100K:-r5g10,r5g10-mixr} --parallel 2 --store-root /tmp/stores --out $OUT/ml100k.json &
python3 benchmarks/run_variants.py specs/beauty.toml benchmarks/variants/base.json --store-root /tmp/stores --out $OUT/beauty.json &
for b in sasrec hstu hstu-large; do
  python3 benchmarks/run_variants.py specs/ml-1m-$b.toml benchmarks/variants/base.json --store-root /tmp/stores --out $OUT/ml1m-$b.json &
done
wait
tail -n 2 $OUT/*.logs/*.log
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
