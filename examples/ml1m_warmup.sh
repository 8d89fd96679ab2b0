#!/usr/bin/env bash
# ML-1M ranking through a sample table with the ranker's own features (user gender / age / occupation,
# movie year and genres): DNN, DIN and TWIN base vs + LUM on that feature set, and the LUM paper's warm-up
# settings (its Table 5): + LUM with the feature set ("feature") and + LUM warm-started from the trained
# base ("param"); 3 seeds each, every + LUM row reading one tiny LUM.
# Run from the repository root:  bash examples/ml1m_warmup.sh
set -euo pipefail
LUMCTL=${LUMCTL:-lumctl}
PYTHON=${PYTHON:-python}

# the ratings as a sample table with feature columns (the path specs/ml-1m-ctr-samples.toml reads)
$PYTHON examples/ml1m_samples.py specs/ml-1m-ctr.toml stores/examples/ml1m-samples
# tokenize -> pack -> pretrain -> query once, then the fuse runs (a warm start waits for its base);
# the table is specs/report-cpu.toml's "ml1m-ranking-cpu"
$LUMCTL eval specs/report-cpu.toml --train --only 'ml-1m-ctr-samples-*' --allow-missing
