# Sourced by the README's commands: makes sure .venv (in the repo root) exists and holds this project with its
# dev and ray extras (Ray: run.engine: ray and its tests). Reinstalls only when pyproject.toml changed since the
# last install (a stamp file records it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "error: Python >= 3.10 is needed ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  echo "setting up $VENV (first time: a few minutes, torch is large)..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev,ray]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
