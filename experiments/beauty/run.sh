#!/usr/bin/env bash
# Train the S3-Rec Beauty rows of specs/report.toml on ONE GPU (default: every 'beauty-*' run: the main
# table, 4 models x 3 seeds, and the SASRec / LUM ablations, 1 seed each), PAR runs at a time, for at most
# LIMIT seconds, then export what `lumctl eval` reads (manifests, metrics, configs, per-user ranks; no
# weights) to $OUT/stores.tgz and the run logs to $OUT/logs.tgz. The runs are small (0.03-0.5M
# non-embedding parameters): a run's speed is bound by kernel launches on its CPU core, so PAR follows
# the cores, not the GPU memory. Stores stay in stores/: a second call finishes what the limit cut off.
# The data: Beauty.txt (RUCAIBox/CIKM2020-S3Rec data/Beauty.txt) under $LUMCTL_DATA/amazon/s3rec/, or
# .data/ or shared/data/ of the checkout.
#   OUT=/tmp/out bash experiments/beauty/run.sh                                     # everything
#   ONLY='beauty-sasrec-s*,beauty-hstu-s*,beauty-hstu-large-s*,beauty-lum-s*' PAR=12 OUT=/tmp/out bash experiments/beauty/run.sh   # main table
#   ONLY='beauty-sasrec-*-s0,beauty-lum-*-s0' PAR=14 OUT=/tmp/out bash experiments/beauty/run.sh                                      # ablations
set -u
[ -d .wheels ] && . experiments/h100/setup.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
for d in "${LUMCTL_DATA:-}" "$PWD/.data" "$PWD/shared/data"; do
  if [ -n "$d" ] && [ -f "$d/amazon/s3rec/Beauty.txt" ]; then export LUMCTL_DATA=$d; break; fi
done
if [ ! -f "${LUMCTL_DATA:-/nonexistent}/amazon/s3rec/Beauty.txt" ]; then
  echo "Beauty.txt not found under \$LUMCTL_DATA, .data or shared/data (amazon/s3rec/Beauty.txt)"; exit 2
fi
REPORT=${REPORT:-specs/report.toml}
ONLY=${ONLY:-beauty-*}
OUT=${OUT:-/tmp/lumctl-beauty}
PAR=${PAR:-12}
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
start=$(date +%s)
timeout ${LIMIT:-510} python3 -m lumctl eval $REPORT --train --only "$ONLY" --parallel $PAR --allow-missing
echo "trained in $(( $(date +%s) - start )) s"
python3 -m lumctl eval $REPORT --dry-run --only "$ONLY" --export /tmp/export-beauty
tar czf $OUT/stores.tgz -C /tmp/export-beauty .
tar czf $OUT/logs.tgz stores/*/logs
# one line per finished run: steps (early stopping), best step, valid and test HR@10 / NDCG@10, seconds
python3 - <<'PY'
import glob, json, os
for m in sorted(glob.glob("stores/*/pretrain/manifest.json")):
    d = json.load(open(m)); c = d.get("counts", {}); v, t = c.get("valid", {}), c.get("test", {})
    run = m.split("/")[1]
    if not t:
        print(f"{run:32s} not finished"); continue
    print(f"{run:32s} steps {c.get('steps')} best {c.get('best_step')} valid {v.get('hr@10', 0):.4f}/{v.get('ndcg@10', 0):.4f} "
          f"test {t.get('hr@10', 0):.4f}/{t.get('ndcg@10', 0):.4f} {d.get('seconds', '')}")
PY
