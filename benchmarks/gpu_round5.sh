#!/usr/bin/env bash
# One device call (session 2): HSTU bias-gather fix check, HSTU 200-step timing, then pretrain
# throughput / MFU of the LUM presets (benchmarks/bench_pretrain.py) with a profile of the 300M step.
. benchmarks/gpu_setup.sh
export OMP_NUM_THREADS=8
python3 benchmarks/bench_gather.py
timeout 240 python3 benchmarks/run_variants.py specs/ml-1m-hstu.toml benchmarks/variants/quick.json --store-root /tmp/stores --out $OUT/quick-ml-1m-hstu.json
grep -h "pretrain: \|median" $OUT/quick-ml-1m-hstu.logs/*.log
cd benchmarks
python3 bench_pretrain.py --presets 19m,100m,300m --rows 4 --out $OUT/pretrain_throughput.json
python3 bench_pretrain.py --presets 1b --rows 2 --out $OUT/pretrain_throughput.json
python3 bench_pretrain.py --presets 100m --rows 4 --with-loader --out $OUT/pretrain_throughput.json
python3 bench_pretrain.py --presets 300m --rows 4 --steps 5 --profile --out $OUT/profile_300m.json 2>&1 | tail -n 30
cd $OUT && tar czf logs.tgz *.logs && rm -rf *.logs
