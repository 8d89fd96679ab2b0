#!/usr/bin/env bash
# Train runs of a report spec on a GPU machine (default: the ML-1M scaling sweep of specs/report.toml -
# 4 sizes, 0.4M -> 99M non-embedding parameters at 200 events, and 5 lengths, 25 -> 400 events, at the
# 'small' preset), PAR at a time, then export what `lumctl eval` reads (manifests, metrics, configs,
# per-user ranks, predictions; no weights) to $OUT/stores.tgz: untar it into a folder and point
# LUMCTL_STORES at it. Stores stay in stores/: a second call finishes what the time limit cut off.
# Other tables: ONLY='ml-1m-sasrec-*,ml-1m-hstu-*' etc.
#   REPORT=specs/report.toml ONLY='ml-1m-size-*,ml-1m-len-*,ml-1m-s0' PAR=4 LIMIT=540 OUT=/tmp/out bash experiments/h100/run.sh
set -u
[ -d .wheels ] && . experiments/h100/setup.sh
REPORT=${REPORT:-specs/report.toml}
ONLY=${ONLY:-ml-1m-size-*,ml-1m-len-*,ml-1m-s0}
OUT=${OUT:-/tmp/lumctl-h100}
mkdir -p $OUT
timeout ${LIMIT:-540} python3 -m lumctl eval $REPORT --train --only "$ONLY" --parallel ${PAR:-4} --allow-missing
python3 -m lumctl eval $REPORT --dry-run --only "$ONLY" --export /tmp/export
tar czf $OUT/stores.tgz -C /tmp/export .
tar czf $OUT/logs.tgz stores/*/logs
grep -h "pretrain: lum\|test hr\|fuse: .* test auc" stores/*/logs/*.log 2>/dev/null | tail -n 20
