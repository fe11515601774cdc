#!/usr/bin/env bash
# The match stage, again and again, on the offline demo: does it ever hang? (issue 20: a forked decode worker
# inherited an import lock that a prefetch thread held, and waited on it for ever at 0 % CPU.)
#
#   scripts/match_loop.sh               # 20 runs, 60 s each at most
#   RUNS=40 TIMEOUT_S=90 scripts/match_loop.sh
#
# A base run folder with taxonomy and images done is made once (BASE, default /tmp/tg-match-loop/base); each
# run copies nothing, it only clears 02_match and runs `--stages match` again under `timeout -s INT`. A run that
# reaches the timeout counts as a hang; any other non-zero exit as a failure. The last line is key=value.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
set +e
export HF_HUB_OFFLINE=1
RUNS="${RUNS:-20}"
TIMEOUT_S="${TIMEOUT_S:-60}"
WORK="${WORK:-/tmp/tg-match-loop}"
BASE="${BASE:-$WORK/base}"
CONFIG="${CONFIG:-configs/demo.yaml}"
TG="$VENV/bin/taskgalaxy"
mkdir -p "$WORK"
if [ ! -f "$BASE/01_images/state.json" ]; then
  echo "making the base run folder $BASE (taxonomy, images) ..." >&2
  "$TG" run "$CONFIG" --dry-run --run-dir "$BASE" --stages taxonomy,images --no-progress >"$WORK/base.log" 2>&1 \
    || { echo "error: the base run failed, see $WORK/base.log" >&2; exit 1; }
fi
hangs=0 failures=0 times=()
for i in $(seq "$RUNS"); do
  rm -rf "$BASE/02_match"
  started=$(date +%s.%N)
  timeout -s INT "$TIMEOUT_S" "$TG" run "$CONFIG" --dry-run --run-dir "$BASE" --stages match --no-progress \
    >"$WORK/run-$i.log" 2>&1
  rc=$?
  seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  if [ "$rc" -eq 124 ]; then
    hangs=$((hangs + 1)); echo "run $i: HANG (no end after ${TIMEOUT_S} s; log $WORK/run-$i.log)"
  elif [ "$rc" -ne 0 ]; then
    failures=$((failures + 1)); echo "run $i: exit $rc after ${seconds} s (log $WORK/run-$i.log)"
  else
    times+=("$seconds"); echo "run $i: ok ${seconds} s"
  fi
done
median=$(printf '%s\n' "${times[@]}" | sort -n \
  | awk '{a[NR]=$1} END {if (NR) printf "%.1f", (NR % 2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2); else print "nan"}')
echo "runs=$RUNS hangs=$hangs failures=$failures median_s=$median timeout_s=$TIMEOUT_S"
[ "$hangs" -eq 0 ] && [ "$failures" -eq 0 ]
