#!/usr/bin/env bash
# GPU checks, one section per pipeline step; each prints its own key=value line and saves it under $OUT
# (or /tmp/tg-gpu-check/results). Sets itself up on a bare machine that holds a copy of the repo:
#
#   scripts/gpu_check.sh            # every section in SECTIONS
#   scripts/gpu_check.sh clip       # only the named ones
#
# Adding a check: write a `section_<name>` function below and add <name> to SECTIONS. A failing section is
# reported and the others still run; the exit status is non-zero when any failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="${GPU_CHECK_WORK:-/tmp/tg-gpu-check}"
RESULTS="${OUT:-$WORK/results}"
mkdir -p "$RESULTS" "$WORK"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# -- setup: a .venv that sees the machine's own torch when it has one (no 2.5 GB download then) ---------------
setup_python() {
  PY="$ROOT/.venv/bin/python"
  if [ -x "$PY" ] && "$PY" -c 'import torch, open_clip, datasets, processors' 2>/dev/null; then
    return 0
  fi
  [ -x "$PY" ] || "${PYTHON:-python3}" -m venv --system-site-packages "$ROOT/.venv" || return 1
  echo "installing the project into $ROOT/.venv ..." >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT" \
    || "$PY" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT" || return 1
  "$PY" -c 'import torch, open_clip, datasets, processors; assert torch.cuda.is_available(), "no CUDA device"' \
    || { echo "error: the environment lacks torch/open_clip/datasets or sees no GPU" >&2; return 1; }
}

# -- sections ---------------------------------------------------------------------------------------------------
section_clip() {
  # Issue 6: ViT-L-14-quickgelu (random weights), bf16, 5,000 JPEGs of 640x480, 19,227 task types.
  # Goal on an H100: ours_img_s >= 2000 end to end and speedup >= 20 over the released code's loop.
  timeout 420 "$PY" scripts/bench_clip.py --gpu --work "$WORK/clip" 2>&1 | tee "$RESULTS/clip.log"
  local status=${PIPESTATUS[0]}
  tail -n 1 "$RESULTS/clip.log" > "$RESULTS/clip.txt"
  return "$status"
}

section_referee() {
  # Issue 8: a realistic-size random-weight Llava in bf16; the original protocol (one generate per sample,
  # image re-encoded each time) against ours (batched, one prefix per image). Goal: speedup >= 10.
  timeout 300 "$PY" scripts/gpu_referee_check.py 2>&1 | tee "$RESULTS/referee.log"
  local status=${PIPESTATUS[0]}
  tail -n 1 "$RESULTS/referee.log" > "$RESULTS/referee.txt"
  return "$status"
}

SECTIONS=(clip referee)

main() {
  local started failed=() name names=("$@")
  [ ${#names[@]} -gt 0 ] || names=("${SECTIONS[@]}")
  setup_python || { echo "gpu_check: setup failed" >&2; exit 2; }
  "$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU", "torch", torch.__version__)'
  for name in "${names[@]}"; do
    started=$SECONDS
    echo "=== $name ==="
    if "section_$name"; then
      echo "=== $name: ok ($((SECONDS - started)) s) ==="
    else
      echo "=== $name: FAILED ($((SECONDS - started)) s) ===" >&2
      failed+=("$name")
    fi
  done
  [ ${#failed[@]} -eq 0 ] || { echo "gpu_check: failed sections: ${failed[*]}" >&2; exit 1; }
}

main "$@"
