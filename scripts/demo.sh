#!/usr/bin/env bash
# The main job, offline: the whole pipeline on configs/demo.yaml against the local API simulator and tiny
# random models. Extra arguments go to `taskgalaxy run` (e.g. --stages taxonomy).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec "$VENV/bin/taskgalaxy" run configs/demo.yaml --dry-run "$@"
