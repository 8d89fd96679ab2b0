#!/usr/bin/env bash
# The ML-1M CTR table of benchmarks/results/fuse_ml1m_cpu_v2/ (CPU, 3 seeds per variant), leak-free LUM.
# That table used a global cutoff ([tokenize.split] pretrain_quantile = 0.5); specs/ml-1m-ctr.toml cuts per
# user (pretrain_fraction = 0.5): reproduce the table with --set tokenize.split.pretrain_quantile=0.5 and no
# pretrain_fraction (a spec of its own), or read the per-user table in benchmarks/results/fuse_ml1m_cpu_v3/.
# Run with the project venv active (python = its python). Prerequisite: LUMCTL_DATA=... lumctl run specs/ml-1m-ctr.toml  (tokenize, pack, pretrain, query; ~20 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
T="env OMP_NUM_THREADS=1 python experiments/ml1m-ctr/fuse_table.py specs/ml-1m-ctr.toml --out benchmarks/results/fuse_ml1m_cpu_v2 --seeds 3"
$T --only dnn-none,dnn-direct+match,din-none,din-direct+match,sim-none,sim-direct+match
$T --only din-direct,din-match,two_tower-none,two_tower-direct+match
$T --only dien-none,dien-direct+match --set epochs=5    # ~1 min per epoch on one core: capped at 5 (valid peaks at 4-6)
