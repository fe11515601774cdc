"""The circuit breaker: after N failed attempts in a row, stop the stage with a message a person can act on.

Counted: 5xx, timeouts, connection errors, non-retryable 4xx (a bad key fails every request) and quota 429s.
Not counted: ordinary 429s (the limiter handles those) and replies that did not parse (the server works).
Any successful attempt closes the count again.
"""

from __future__ import annotations

from collections import Counter

from processors.llm.errors import CircuitOpenError
from processors.llm.hosts import is_openai_host


class CircuitBreaker:
    def __init__(self, threshold: int, *, endpoint: str, base_url: str, model: str, key_env: str | None):
        self.threshold = threshold
        self._where = f"LLM endpoint {endpoint!r} ({base_url}, model {model})"
        self._endpoint = endpoint
        self._openai = is_openai_host(base_url)
        self._key_env = key_env
        self._streak = 0
        self._kinds: Counter[str] = Counter()
        self._last_detail = ""
        self.open_message: str | None = None

    def success(self) -> None:
        self._streak = 0
        self._kinds.clear()

    def failure(self, what: str, detail: str) -> None:
        self._streak += 1
        self._kinds[what] += 1
        self._last_detail = detail
        if self._streak >= self.threshold and self.open_message is None:
            self.open_message = self._message()

    def check(self) -> None:
        if self.open_message is not None:
            raise CircuitOpenError(self.open_message)

    def _message(self) -> str:
        kinds = ", ".join(f"{what} x{count}" for what, count in self._kinds.most_common())
        dominant = self._kinds.most_common(1)[0][0] if self._kinds else ""
        return (
            f"{self._where} failed {self._streak} attempts in a row ({kinds}). The server said: "
            f"{self._last_detail}. Stopped instead of retrying forever. {self._advice(dominant)} Then rerun: "
            "every answer received so far is in the request cache and is not paid for again."
        )

    def _advice(self, what: str) -> str:
        """What to do, by the kind of failure that dominated the streak (a 400 is not an unreachable server)."""
        status = int(what.split()[1]) if what.startswith("HTTP ") and what.split()[1].isdigit() else None
        key = f"the key in ${self._key_env}" if self._key_env else "the server's API key (api_key_env)"
        if what == "HTTP 429 quota":
            return f"The account behind {key} has no quota left: add credit or use another key."
        if status in (401, 403):
            return f"The server refused the credentials: check {key} (a vLLM server started with --api-key " \
                   "needs the same key)."
        if status == 404:
            return ("The model name (or the URL path) is not served there: set the endpoint's `model` to a name "
                    "the server lists (vLLM: its --served-model-name; GET /v1/models shows them).")
        if status is not None and 400 <= status < 500:
            return ("The server rejected the request itself, not the connection: its message above says what "
                    "it refused (a parameter it does not accept, a server flag it needs, a limit exceeded). "
                    "Change the endpoint or referee settings, or the server's flags, to match.")
        if what == "timeout":
            batch = (" For a large run, `mode: batch` (the Batch API: half the price, answers within 24 h) has no "
                     "per-request timeout at all.") if self._openai else ""
            return (f"No reply came within the endpoint's timeout: raise `timeout_s` in llm.endpoints."
                    f"{self._endpoint} (default 120 s) if the server is just slow (long replies, large images, a "
                    f"queue), or lower its `max_concurrency` if it is overloaded; check its logs if it hangs."
                    f"{batch}")
        return "Check that the server is reachable and healthy (its URL, port and logs)."
