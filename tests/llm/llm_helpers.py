"""Helpers shared by the LLM tests and their subprocess workers (run as ``python llm_helpers.py ...``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from builder.stage import StageContext  # noqa: E402
from processors.llm import EndpointSettings, LLMRequest, LLMSettings, run_requests  # noqa: E402
from processors.llm.settings import BreakerSettings  # noqa: E402

KEY_ENV = "TG_TEST_LLM_KEY"
TEST_KEY = "sk-test-SECRET-4f1c9e2ab7d34e55a0c1"


def fast_settings(base_url: str, *, breaker: int = 25, cache: bool = True, **overrides) -> LLMSettings:
    """Settings for tests: short backoffs and timeouts so retries take milliseconds, not minutes."""
    values = dict(base_url=base_url, api_key_env=KEY_ENV, model="gpt-4o-2024-08-06", backoff_initial_s=0.01,
                  backoff_max_s=5.0, timeout_s=2.0, max_retries=4, batch_poll_s=0.05)
    values.update(overrides)
    return LLMSettings(endpoints={"sim": EndpointSettings(**values)}, cache=cache,
                       breaker=BreakerSettings(consecutive_failures=breaker))


def make_ctx(run_dir: Path, settings: LLMSettings, *, dry_run: bool = False, services: dict | None = None):
    stage_dir = run_dir / "03_filter"
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=run_dir, stage_dir=stage_dir, cache_dir=run_dir / "cache", dry_run=dry_run,
                        settings=SimpleNamespace(llm=settings), load_stage=lambda name: None,
                        services=services or {})


def json_requests(n: int, *, prefix: str = "row", version: str = "v1") -> list[LLMRequest]:
    """``n`` distinct requests whose replies must be JSON objects."""

    def parse(text: str) -> dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value

    return [LLMRequest(key=f"{prefix}-{i}", prompt_version=version, parse=parse,
                       messages=[{"role": "user", "content": f"Reply in JSON about item {prefix}-{i}."}])
            for i in range(n)]


def worker(argv: list[str]) -> None:
    """Subprocess entry: ``llm_helpers.py RUN_DIR BASE_URL N [endpoint overrides as JSON]``; prints a summary."""
    run_dir, base_url, count = Path(argv[0]), argv[1], int(argv[2])
    overrides = json.loads(argv[3]) if len(argv) > 3 else {}
    ctx = make_ctx(run_dir, fast_settings(base_url, **overrides))
    ctx.live_usage_path = run_dir / "live.jsonl"  # the spend journal, as the runner keeps it per shard
    results = run_requests(json_requests(count), endpoint="sim", ctx=ctx)
    print(json.dumps({"ok": sum(r.ok for r in results), "usage": ctx.usage}), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1:])
