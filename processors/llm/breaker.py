"""The circuit breaker: after N failed attempts in a row, stop the stage with a message a person can act on.

Counted: 5xx, timeouts, connection errors, non-retryable 4xx (a bad key fails every request) and quota 429s.
Not counted: ordinary 429s (the limiter handles those) and replies that did not parse (the server works).
Any successful attempt closes the count again.
"""

from __future__ import annotations

from collections import Counter

from processors.llm.errors import CircuitOpenError


class CircuitBreaker:
    def __init__(self, threshold: int, *, endpoint: str, base_url: str, model: str, key_env: str | None):
        self.threshold = threshold
        self._where = f"LLM endpoint {endpoint!r} ({base_url}, model {model})"
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
        key_hint = f"the key in ${self._key_env} is valid and has quota, " if self._key_env else ""
        return (
            f"{self._where} failed {self._streak} attempts in a row ({kinds}; last: {self._last_detail[:200]}). "
            f"Stopped instead of retrying forever. Check that the server is reachable, {key_hint}and the model "
            "name is right, then rerun: every answer received so far is in the request cache and is not paid "
            "for again."
        )
