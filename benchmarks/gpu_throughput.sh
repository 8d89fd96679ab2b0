#!/usr/bin/env bash
# One device call: the GPU tests, then pretrain throughput / MFU of the LUM presets on ML-1M
# packed rows (4096 tokens, bf16, flex attention, torch.compile, fused AdamW), one at a time.
. benchmarks/gpu_setup.sh
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > $OUT/gputest.txt 2>&1; tail -n 1 $OUT/gputest.txt
python3 benchmarks/run_variants.py specs/ml-1m.toml benchmarks/variants/throughput.json --only ${TP:-tp-19m,tp-100m,tp-300m} --store-root /tmp/stores --out $OUT/throughput.json
grep -h "pretrain: lum\|tok/s\|test hr" $OUT/throughput.logs/*.log | tail -n 12
python3 -c "
import json; d = json.load(open('$OUT/throughput.json'))
for r in d['results']: print(r['name'], r['returncode'], 'tok/s', r.get('tokens_per_s_median'), 'TFLOP/s', r.get('tflops_median'))"
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
