#!/usr/bin/env bash
# ML-1M CTR through a sample table vs the built-in route, same split, 3 seeds each (base model).
# Run from the repository root:  bash examples/ml1m_samples.sh [SPEC] [BACKBONE]
set -euo pipefail
SPEC=${1:-specs/ml-1m-ctr.toml}
BACKBONE=${2:-din}
WORK=${WORK:-stores/examples/ml1m-samples}
LUMCTL=${LUMCTL:-lumctl}
PYTHON=${PYTHON:-python}

# the ratings as a sample table (user_id, item_id, timestamp, label, split; gender, age, occupation,
# year, genres, hour: feature columns these two specs do not declare) and two specs
$PYTHON examples/ml1m_samples.py "$SPEC" "$WORK" --backbone "$BACKBONE" --lum none
for route in builtin samples; do
  $LUMCTL tokenize "$WORK/$route.toml"
  $LUMCTL fuse "$WORK/$route.toml" --seeds 3     # prints: test auc mean ± std over the seeds
done
