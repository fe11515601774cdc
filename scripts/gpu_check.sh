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

# -- setup ------------------------------------------------------------------------------------------------------
# GPU machines here come with torch, CUDA and an older transformers but no network. scripts/gpu_wheels.sh (run
# where pip works) puts the project's other dependencies, and the transformers version the code is tested
# with, as CPython 3.12 wheels in .whl/; they go into a folder ahead on PYTHONPATH, never over the machine's
# torch. Elsewhere: the repo's .venv, or the current python3.
setup_python() {
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    echo "installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into $WORK/site ..." >&2
    "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$WORK/site" "$ROOT"/.whl/*.whl || return 1
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
  fi
  local candidate check='import torch, open_clip, datasets, transformers, processors.clip.matcher, processors.referees.local
assert torch.cuda.is_available(), "torch sees no CUDA device"'
  for candidate in "$ROOT/.venv/bin/python" "${PYTHON:-python3}"; do
    command -v "$candidate" >/dev/null || continue
    if "$candidate" -c "$check"; then PY="$candidate"; return 0; fi
  done
  echo "error: no python here imports torch (with CUDA), open_clip, datasets and transformers; run" \
       "scripts/gpu_wheels.sh where pip can download, or install the project (pip install -e .)" >&2
  return 1
}

# -- sections ---------------------------------------------------------------------------------------------------
section_clip() {
  # Issue 6: ViT-L-14-quickgelu (random weights), bf16, 10,000 JPEGs of 640x480, 19,227 task types.
  # Goal on an H100: ours_img_s >= 2000 end to end and speedup >= 20 over the released code's loop.
  timeout 300 "$PY" scripts/bench_clip.py --gpu --work "$WORK/clip" 2>&1 | tee "$RESULTS/clip.log"
  local status=${PIPESTATUS[0]}
  grep '^model=' "$RESULTS/clip.log" | tail -n 1 > "$RESULTS/clip.txt"
  return "$status"
}

section_stage() {
  # Issue 6, as a run uses it: the match stage through the Runner (Arrow shards, path checks, per-shard
  # start), 10,000 JPEGs in shards of 1,000 / 2,000 / 5,000; img/s without the first shard (load, compile).
  timeout 240 "$PY" scripts/bench_clip.py --gpu --stage --stage-shards 1000 2000 5000 --work "$WORK/clip" 2>&1 \
    | tee "$RESULTS/stage.log"
  local status=${PIPESTATUS[0]}
  tail -n 1 "$RESULTS/stage.log" > "$RESULTS/stage.txt"
  return "$status"
}

section_referee() {
  # Issue 8: a realistic-size random-weight Llava in bf16; the original protocol (one generate per sample,
  # image re-encoded each time) against ours (batched, one prefix per image). Goal: speedup >= 10.
  timeout 200 "$PY" scripts/gpu_referee_check.py 2>&1 | tee "$RESULTS/referee.log"
  local status=${PIPESTATUS[0]}
  tail -n 1 "$RESULTS/referee.log" > "$RESULTS/referee.txt"
  return "$status"
}

SECTIONS=(clip stage referee)

main() {
  local started failed=() name names=("$@")
  [ ${#names[@]} -gt 0 ] || names=("${SECTIONS[@]}")
  setup_python || { echo "gpu_check: setup failed" >&2; exit 2; }
  "$PY" -c 'import torch, transformers, open_clip; print("gpu_check:", torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__, "open_clip", open_clip.__version__)'
  nproc; df -h /dev/shm | tail -n 1
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
