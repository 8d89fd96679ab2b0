#!/usr/bin/env bash
# Pack the small, human-readable parts of finished stores (manifests, metrics, configs; no weights)
# under $1 into the tarball $2, so GPU runs can be read by `lumctl eval` on another machine.
root=${1:-/tmp/stores}; out=${2:-$OUT/stores.tgz}
cd "$root" && find . \( -name manifest.json -o -name metrics.json -o -name metrics.jsonl -o -name config.json \
  -o -name loss.png -o -name "test_*.npy" -o -name 'results.*' \) -not -path '*/checkpoints/*' -print0 | tar czf "$out" --null -T -
