#!/usr/bin/env bash
# Issue 23, item 3: LLaMA-Factory's and ms-swift's OWN dataset-loading code reads our exports.
#
#   scripts/trainer_check.sh            # builds/reuses the venvs, a demo dry run, two exports, two harnesses
#   RUN_DIR=runs/x scripts/trainer_check.sh   # reuse a finished run instead of making the demo dry run
#   KEEP=1 scripts/trainer_check.sh     # keep the temp folder (exports, logs) and print its path
#
# Each trainer gets a venv of its own under .trainer-venvs/ (git-ignored; never the project's .venv: the
# trainers pin other transformers/datasets versions). First time: ~4 min each (pip, torch from local disk);
# later runs reuse them (a stamp file per pinned spec). Pip needs the package index; nothing else is
# downloaded: the harness runs with HF_HUB_OFFLINE=1 and builds a tiny Llava processor (no weights) itself.
# What each harness checks is in scripts/trainer_check.py. The last line is key=value pairs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="${TRAINER_VENVS:-$ROOT/.trainer-venvs}"
PY="${PYTHON:-python3}"
LF_SPEC="${LLAMAFACTORY_SPEC:-llamafactory==0.9.5}"
SWIFT_SPEC="${SWIFT_SPEC:-ms-swift==4.6.0}"
# LLaMA-Factory needs torchvision: the pair that lies on local disk here (CUDA build, runs on the CPU).
LF_TORCH="${LLAMAFACTORY_TORCH:-torch==2.14.1 torchvision==0.29.1}"
# ms-swift needs no torchvision: the CPU torch keeps its venv at ~2 GB instead of ~6.6 GB.
SWIFT_TORCH="${SWIFT_TORCH:-torch==2.13.0+cpu}"

log() { echo "[trainer_check] $*" >&2; }

# make_venv NAME "TORCH SPECS" "TRAINER SPEC": prints nothing, leaves $VENVS/NAME ready (stamped)
make_venv() {
  local name="$1" torch_specs="$2" spec="$3" venv="$VENVS/$1"
  local stamp="$venv/.trainer-ready-$(echo "$torch_specs $spec" | sha256sum | cut -c1-12)"
  if [ -f "$stamp" ]; then log "$name: reusing $venv"; return 0; fi
  local t0=$SECONDS
  mkdir -p "$VENVS"
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  log "$name: installing $torch_specs $spec into $venv (a few minutes the first time)..."
  # shellcheck disable=SC2086
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $torch_specs "$spec" \
      > "$venv/install.log" 2>&1; then
    log "$name: pip failed with '$torch_specs'; retrying with the torch the trainer asks for"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec" >> "$venv/install.log" 2>&1 \
      || { log "$name: pip install failed, last lines:"; tail -n 20 "$venv/install.log" >&2; return 1; }
  fi
  rm -f "$venv"/.trainer-ready-*
  touch "$stamp"
  log "$name: installed in $((SECONDS - t0)) s ($(du -sh "$venv" | cut -f1))"
}

T_START=$SECONDS
LF_OK=1; SW_OK=1
make_venv llamafactory "$LF_TORCH" "$LF_SPEC" || LF_OK=0
make_venv swift "$SWIFT_TORCH" "$SWIFT_SPEC" || SW_OK=0
T_VENVS=$((SECONDS - T_START))

TMP="$(mktemp -d "${TMPDIR:-/tmp}/trainer_check.XXXXXX")"
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$TMP"' EXIT; else log "keeping $TMP"; fi

# The project's own venv runs the project (never installed into here when it exists).
if [ -x "$ROOT/.venv/bin/python" ]; then PROJ_PY="$ROOT/.venv/bin/python"
else source "$ROOT/scripts/_venv.sh"; PROJ_PY="$ROOT/.venv/bin/python"; fi

t0=$SECONDS
if [ -n "${RUN_DIR:-}" ]; then
  RUN="$RUN_DIR"; log "reusing the run $RUN"
else
  RUN="$TMP/run"
  log "demo dry run -> $RUN (1-2 min)..."
  (cd "$ROOT" && HF_HUB_OFFLINE=1 "$PROJ_PY" taskgalaxy.py run configs/demo.yaml --dry-run --run-dir "$RUN" \
     --no-progress > "$TMP/run.log" 2>&1) || { log "the demo run failed:"; tail -n 30 "$TMP/run.log" >&2; exit 1; }
fi
T_RUN=$((SECONDS - t0))
t0=$SECONDS
for fmt in llamafactory swift; do
  (cd "$ROOT" && "$PROJ_PY" taskgalaxy.py export "$RUN" --format "$fmt" --out "$TMP/$fmt" > "$TMP/export_$fmt.log" 2>&1) \
    || { log "export $fmt failed:"; tail -n 30 "$TMP/export_$fmt.log" >&2; exit 1; }
  log "$(tail -n 1 "$TMP/export_$fmt.log")"
done
T_EXPORT=$((SECONDS - t0))

run_harness() {  # NAME: runs the harness in that trainer's venv, its output in $TMP/NAME.log
  local name="$1"
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$TMP/hf-home" \
    MODELSCOPE_CACHE="$TMP/ms-cache" "$VENVS/$name/bin/python" "$ROOT/scripts/trainer_check.py" \
    "$name" "$TMP/$name" "$TMP/work-$name" > "$TMP/$name.log" 2>&1 || true
  grep -E "^\[$name\]" "$TMP/$name.log" >&2 || true
  grep -E "^RESULT " "$TMP/$name.log" | tail -n 1 | cut -c8- > "$TMP/$name.result" || true
  if [ ! -s "$TMP/$name.result" ]; then log "$name: the harness gave no result, last lines:"; tail -n 30 "$TMP/$name.log" >&2; fi
}
t0=$SECONDS
[ "$LF_OK" = 1 ] && run_harness llamafactory
T_LF=$((SECONDS - t0)); t0=$SECONDS
[ "$SW_OK" = 1 ] && run_harness swift
T_SW=$((SECONDS - t0))

# The key=value line (read from the two RESULT lines).
"$PY" - "$TMP" "$LF_OK" "$SW_OK" "$T_VENVS" "$T_RUN" "$T_EXPORT" "$T_LF" "$T_SW" <<'PYEOF'
import json, pathlib, sys
tmp, lf_ok, sw_ok = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
times = dict(zip(["venvs_s", "run_s", "export_s", "lf_s", "swift_s"], sys.argv[4:9]))
def res(name):
    p = tmp / f"{name}.result"
    return json.loads(p.read_text()) if p.exists() and p.read_text().strip() else None
lf, sw = res("llamafactory"), res("swift")
out, good = [], True
def frac(r, key):
    return f"{r.get(key, 0)}/{r['n']}"
if lf and lf.get("error") is None:
    out += [f"llamafactory_read={frac(lf, 'read')}", f"llamafactory_images={frac(lf, 'images_opened')}",
            f"llamafactory_image_rule={frac(lf, 'rule_ok')}",
            f"llamafactory_rule_fires={'yes' if lf['rule_fires'] else 'no'}"]
    good &= lf["read"] == lf["images_opened"] == lf["rule_ok"] == lf["n"] and lf["rule_fires"] and lf["text_ok"]
else:
    out.append("llamafactory_read=" + ("not-installed" if not lf_ok else "error")); good = False
if sw and sw.get("error") is None:
    out += [f"swift_read={frac(sw, 'read')}", f"swift_images={frac(sw, 'images_resolved')}",
            f"swift_encoded={frac(sw, 'encoded')}", f"swift_image_rule={frac(sw, 'rule_ok')}"]
    good &= sw["read"] == sw["images_resolved"] == sw["rule_ok"] == sw["encoded"] == sw["n"] and sw["text_ok"]
else:
    out.append("swift_read=" + ("not-installed" if not sw_ok else "error")); good = False
out.append(f"image_token_rule={'ok' if good else 'FAIL'}")
out += [f"{k}={v}" for k, v in times.items()]
print(" ".join(out))
sys.exit(0 if good else 1)
PYEOF
