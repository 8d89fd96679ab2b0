#!/usr/bin/env bash
# One device call (session 2, profiling round): GPU tests, 200-step timings of LUM / SASRec / HSTU /
# HSTU-large on ML-1M, then pretrain throughput of the 19M -> 1B presets, one process at a time.
. benchmarks/gpu_setup.sh
export OMP_NUM_THREADS=4
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > $OUT/gputest.txt 2>&1; tail -n 1 $OUT/gputest.txt
for s in ml-1m ml-1m-sasrec ml-1m-hstu ml-1m-hstu-large; do
  python3 benchmarks/run_variants.py specs/$s.toml benchmarks/variants/quick.json --store-root /tmp/stores --out $OUT/quick-$s.json
  grep -h "pretrain: \(lum\|sasrec\|hstu\)\|median" $OUT/quick-$s.logs/*.log
done
python3 benchmarks/run_variants.py specs/ml-1m.toml benchmarks/variants/throughput.json --store-root /tmp/stores --out $OUT/throughput.json
grep -h "pretrain: lum\|median\|Error\|error" $OUT/throughput.logs/*.log | tail -n 20
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
