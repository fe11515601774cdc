#!/usr/bin/env bash
# The main job, offline: the whole pipeline on configs/demo.yaml against the local API simulator and tiny
# random models, then the LLaVA export, the Hub-layout folder (what `push --repo-id` would upload) and a
# human-audit page of 20 samples (runs/demo-audit/index.html).
# Extra arguments go to `taskgalaxy run` (e.g. --no-progress, or --stages taxonomy, which skips the export).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
RUN=runs/demo-dry-run
"$VENV/bin/taskgalaxy" run configs/demo.yaml --dry-run "$@"
if [[ " $* " != *" --stages"* ]]; then
  "$VENV/bin/taskgalaxy" export "$RUN" --llava runs/demo-export/demo_llava.json
  "$VENV/bin/taskgalaxy" push "$RUN" --local-dir runs/demo-hub
  "$VENV/bin/taskgalaxy" audit "$RUN" --sample 20 --out runs/demo-audit  # a page to label by hand (README)
  echo "next: .venv/bin/taskgalaxy status $RUN   |   .venv/bin/python -c \"import datasets; print(datasets.load_dataset('runs/demo-hub', 'qa'))\""
fi
