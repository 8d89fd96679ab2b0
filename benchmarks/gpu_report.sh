#!/usr/bin/env bash
# One device call: train runs of a report spec on the GPU (default: the ML-1M scaling sweep of
# specs/report.toml - 4 sizes, 0.4M -> 99M non-embedding parameters at 200 events, and 5 lengths,
# 25 -> 400 events, at the 'small' preset), PAR at a time, then export what `lumctl eval` reads
# (manifests, metrics, configs, per-user ranks, predictions; no weights) to $OUT/stores.tgz
# (untar it into a folder and point LUMCTL_STORES at it, or into stores/).
# Stores stay in stores/ (ignored, kept between calls while the machine is warm): a second call
# finishes what the time limit cut off. Other tables: ONLY='ml-1m-sasrec-*,ml-1m-hstu-*' etc.
#   REPORT=specs/report.toml ONLY='ml-1m-size-*,ml-1m-len-*,ml-1m-s0' PAR=4 LIMIT=540 bash benchmarks/gpu_report.sh
. benchmarks/gpu_setup.sh
REPORT=${REPORT:-specs/report.toml}
ONLY=${ONLY:-ml-1m-size-*,ml-1m-len-*,ml-1m-s0}
timeout ${LIMIT:-540} python3 examples/run_report.py $REPORT --only "$ONLY" --parallel ${PAR:-4}
python3 examples/run_report.py $REPORT --only "$ONLY" --dry-run --export /tmp/export
tar czf $OUT/stores.tgz -C /tmp/export .
tar czf $OUT/logs.tgz stores/*/logs
grep -h "pretrain: lum\|test hr\|fuse: .* test auc" stores/*/logs/*.log 2>/dev/null | tail -n 20
