#!/usr/bin/env bash
# The Taobao pipeline at 100M synthetic rows on one GPU machine (specs/taobao-synth-gpu.toml), verb by verb,
# each timed (wall, peak RSS) into $OUT/<verb>.log and $OUT/times.txt. Every verb is "up to date" when its
# store is there, and a query cut short continues from its written batches, so calling this again on the
# same (still warm) machine finishes what a time limit cut off.
#   OUT=/tmp/out LIMIT=560 bash experiments/taobao-scale/run.sh                 # until LIMIT seconds
#   STEPS=2000 OUT=/tmp/out bash experiments/taobao-scale/run.sh                # a longer pretrain
#   SPEC=my.toml ...                                                             # another spec (default taobao-synth-gpu)
#   VERBS="query" ...                                                            # only these verbs (default: all five)
#   EXTRA="--set query.attention=flex" ...                                       # more overrides, every verb
set -u
[ -d .wheels ] && [ -z "${NO_SETUP:-}" ] && . experiments/h100/setup.sh   # NO_SETUP=1: use this environment
export LUMCTL_STORES=${LUMCTL_STORES:-$PWD/stores}
OUT=${OUT:-/tmp/lumctl-taobao}
mkdir -p $OUT
S=${SPEC:-specs/taobao-synth-gpu.toml}
STEPS=${STEPS:-300}
WARM=$(( STEPS < 250 ? STEPS / 5 : 50 ))
SET=(--set pretrain.optim.max_steps=$STEPS --set pretrain.eval.every_steps=$STEPS --set pretrain.optim.warmup_steps=$WARM ${EXTRA:-})
end=$(( $(date +%s) + ${LIMIT:-560} ))
for verb in ${VERBS:-synth tokenize pack pretrain query}; do
  left=$(( end - $(date +%s) ))
  [ $left -le 5 ] && { echo "== $verb: not started (time limit)" | tee -a $OUT/times.txt; break; }
  python3 - "$left" "$verb" "$S" "${SET[@]}" >> $OUT/$verb.log 2>&1 <<'PY'
import resource, subprocess, sys, time
t, left = time.time(), float(sys.argv[1])
try:  # past the limit the verb is killed (a query keeps its written batches for the next call)
    rc = subprocess.run([sys.executable, "-m", "lumctl", *sys.argv[2:]], timeout=left).returncode
except subprocess.TimeoutExpired:
    rc = 124
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(f"== {sys.argv[2]}: rc={rc} wall={time.time() - t:.1f}s peak_rss={rss:.2f}GiB", flush=True)
sys.exit(rc)
PY
  rc=$?
  grep "^== $verb" $OUT/$verb.log | tail -1 >> $OUT/times.txt
  [ $rc -ne 0 ] && { echo "== $verb: stopped (rc=$rc)" | tee -a $OUT/times.txt; break; }
done
cat $OUT/times.txt
for verb in tokenize pack pretrain query; do
  [ -f $OUT/$verb.log ] && tr '\r' '\n' < $OUT/$verb.log | grep -E "^$verb: [a-z0-9]" | grep -v "%)" | tail -4
done
tr '\r' '\n' < $OUT/query.log 2>/dev/null | grep "%)" | tail -2
df -h . | tail -1
