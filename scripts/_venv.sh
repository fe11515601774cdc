# Sourced by the README's commands: makes sure .venv (in the repo root) exists and holds this project with its
# dev and ray extras (Ray: run.engine: ray and its tests). Reinstalls only when pyproject.toml changed since the
# last install (a stamp file records it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
VENV_NEEDS_GB=8
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "error: Python >= 3.10 is needed ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  echo "setting up $VENV (first time: a few minutes, torch is large)..." >&2
  # torch's CUDA build (pip's default for the open_clip/torchvision pins) and its libraries are ~7 GB: say so
  # before pip runs out of room halfway, and name the folder to clear when it does.
  free_gb=$(df -Pk "$ROOT" | awk 'NR==2 {printf "%d", $4 / 1048576}')
  if [ "${free_gb:-0}" -lt "$VENV_NEEDS_GB" ]; then
    echo "warning: ${free_gb} GB free on the disk of $ROOT; the venv needs about $VENV_NEEDS_GB GB" >&2
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev,ray]"; then
    free_gb=$(df -Pk "$ROOT" | awk 'NR==2 {printf "%d", $4 / 1048576}')
    echo "error: installing the project into $VENV failed (pip's message above; ${free_gb} GB free now," \
         "about $VENV_NEEDS_GB GB needed). Free some room, then run this command again." >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
