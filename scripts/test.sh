#!/usr/bin/env bash
# The test suite, offline. Extra arguments go to pytest (e.g. -k resume, -x).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest "$@"
