#!/usr/bin/env bash
# Step 3 for your own ranker: log -> tokenize -> pack -> pretrain -> query -> export to parquet.
# OUT.parquet holds the sample table plus o_q1..o_qN, e_item, sim_q1..sim_qN (point in time);
# OUT_items.parquet the item embeddings by raw item id; OUT.manifest.json names checkpoint and query store.
# Run from the repository root:  bash examples/export.sh [SPEC] [SAMPLES]
# SAMPLES: any CSV/parquet with user_id, item_id, timestamp columns (default: ML-1M ratings as samples).
set -euo pipefail
SPEC=${1:-specs/ml-1m-ctr.toml}
WORK=${WORK:-stores/examples/export}
LUMCTL=${LUMCTL:-lumctl}
PYTHON=${PYTHON:-python}

for verb in tokenize pack pretrain query; do
  $LUMCTL "$verb" "$SPEC"
done
SAMPLES=${2:-}
if [ -z "$SAMPLES" ]; then
  $PYTHON examples/ml1m_samples.py "$SPEC" "$WORK"
  SAMPLES="$WORK/ml1m_samples.parquet"
fi
$LUMCTL export "$SPEC" --samples "$SAMPLES" --out "$WORK/lum_features.parquet"
