"""Run the toy pipeline in its own process: ``python toy_run.py RUN_DIR CONFIG_JSON [STAGES]``.

Used by tests that kill a run mid-stage or race two runs on one folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from toy_stages import TOY_STAGES  # noqa: E402

from builder.config import build_config_model, validate_config  # noqa: E402
from builder.runner import Runner  # noqa: E402


def make_runner(run_dir: str | Path, config: dict, *, progress: bool = False) -> Runner:
    model = build_config_model(TOY_STAGES)
    validated = validate_config(config, model, base_dir=Path(run_dir).parent)
    return Runner(TOY_STAGES, validated, Path(run_dir), progress=progress)


if __name__ == "__main__":
    run_dir, config_json = sys.argv[1], sys.argv[2]
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    make_runner(run_dir, json.loads(config_json)).run(only)
