#!/usr/bin/env bash
# One device call (session 3): the ML-1M ranking tables of specs/report.toml (the leak-free LUM of
# specs/ml-1m-ctr-gpu.toml, then DNN/DIN/DIEN/SIM/HSTU/two-tower base and + LUM, DIN ablations, 3 seeds
# each, fuse on the GPU), and beside it the missing baseline cell: HSTU-large on Beauty, 3 seeds.
# Brings back: $OUT/ctr-stores.tgz (what `lumctl eval` reads, no weights), $OUT/ctr.log,
# $OUT/ctr-logs.tgz, $OUT/beauty-hstu-large.json, $OUT/beauty-stores.tgz.
. benchmarks/gpu_setup.sh
export OMP_NUM_THREADS=1
(timeout ${LIMIT:-540} python3 benchmarks/run_variants.py specs/beauty.toml benchmarks/variants/baselines-beauty.json \
   --only hstu-large-s0,hstu-large-s1,hstu-large-s2 --parallel 3 --store-root /tmp/stores \
   --out $OUT/beauty-hstu-large.json > $OUT/beauty.log 2>&1) &
timeout ${LIMIT:-540} python3 examples/run_report.py specs/report.toml --only 'ml-1m-ctr-gpu-*' --parallel ${PAR:-8} \
  --store-root /tmp/rstores 2>&1 | tee $OUT/ctr.log
wait
python3 examples/run_report.py specs/report.toml --only 'ml-1m-ctr-gpu-*' --store-root /tmp/rstores --dry-run --export /tmp/export
tar czf $OUT/ctr-stores.tgz -C /tmp/export .
tar czf $OUT/ctr-logs.tgz -C /tmp/rstores/report logs
bash benchmarks/collect_stores.sh /tmp/stores $OUT/beauty-stores.tgz
grep -h "test auc\|pretrain: lum\|valid ndcg" /tmp/rstores/report/logs/*.log | tail -n 40
tail -n 5 $OUT/beauty.log
