#!/usr/bin/env bash
# The Taobao pipeline at scale, verb by verb, each timed:
#   synth (a Taobao-shaped log) -> tokenize -> pack -> pretrain -> query
# Usage: examples/taobao_scale.sh [SPEC] [--set section.key=value ...]
#   examples/taobao_scale.sh                                           # 100M rows, the 19m LUM on one GPU
#   examples/taobao_scale.sh specs/taobao-synth-gpu.toml --set synth.rows=2_000_000
# LUMCTL (default: lumctl) is the command that runs a verb; stores go under LUMCTL_STORES (default: stores).
set -euo pipefail
spec=${1:-specs/taobao-synth-gpu.toml}
shift $(( $# > 0 ? 1 : 0 ))
lumctl=${LUMCTL:-lumctl}
now() { python3 -c 'import time; print(f"{time.time():.2f}")'; }
all=$(now)
for verb in synth tokenize pack pretrain query; do
  t=$(now)
  $lumctl "$verb" "$spec" "$@"
  echo "== $verb: $(python3 -c "print(f'{$(now) - $t:.1f}')") s"
done
echo "== all: $(python3 -c "print(f'{$(now) - $all:.1f}')") s"
