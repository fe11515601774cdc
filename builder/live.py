"""Live figures of a running stage: rows done, rows/s, time left, money spent and projected, per-endpoint gauges.

The kernel reads only generic counters: the rows the engine reports (``on_rows``), the stage's spend records
(``builder.outputs.stage_totals``: finished shards' stats plus the live spend journals of the shards in
flight) and, where a run-time service offers one, an *endpoint provider*: ``services[LIVE_ENDPOINTS]`` is a
callable returning ``{endpoint: {"in_flight", "limit", "requests", "rate_limited", "retries"}}`` (counters
since the run started; the LLM layer publishes its accounts there). Nothing here knows what an endpoint is.

A running stage also persists its figures, atomically every few seconds, to ``NN_stage/live.json``
(``LIVE_FILE``), so ``taskgalaxy status RUN --watch`` shows the same from another process; the file is
removed when the stage ends.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from builder import runfolder as rf

logger = logging.getLogger(__name__)

LIVE_ENDPOINTS = "live_endpoints"  # services key: () -> {endpoint: {gauge: number}}
LIVE_FILE = "live.json"
RATE_WINDOW_S = 30.0  # rows/s is measured over the last this many seconds
GAUGES = ("in_flight", "limit")  # point-in-time figures; the other endpoint figures are counters
COUNTERS = ("requests", "rate_limited", "retries")

EndpointProvider = Callable[[], dict[str, dict[str, float]]]


class RowsTracker:
    """Rows done by a stage and their recent rate; ``add`` may be called from any thread."""

    def __init__(self, total: int, done: int = 0, clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.clock = total, done, clock
        self.started = clock()
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(self.started, done)])
        self._first = done  # rows done before this run (a resume): not part of this run's rate
        self._lock = threading.Lock()

    def add(self, rows: int) -> None:
        with self._lock:
            self.done += rows
            now = self.clock()
            self._samples.append((now, self.done))
            while len(self._samples) > 2 and self._samples[1][0] < now - RATE_WINDOW_S:
                self._samples.popleft()

    def rate(self) -> float:
        with self._lock:
            then, done_then = self._samples[0]
            elapsed = self.clock() - then
            return (self.done - done_then) / elapsed if elapsed > 0 else 0.0

    def mean_rate(self) -> float:
        elapsed = self.clock() - self.started
        return (self.done - self._first) / elapsed if elapsed > 0 else 0.0

    def elapsed(self) -> float:
        return self.clock() - self.started


class EndpointWatch:
    """The provider's figures since a stage started: counters less their value at the start, gauges as they
    are; endpoints the stage has not used are left out. A failing provider shows nothing, never stops a run."""

    def __init__(self, provider: EndpointProvider | None):
        self.provider = provider
        self.baseline = self._read()

    def _read(self) -> dict[str, dict[str, float]]:
        if self.provider is None:
            return {}
        try:
            return {str(name): dict(figures) for name, figures in self.provider().items()}
        except Exception:  # noqa: BLE001 - a display must never stop paid work
            logger.debug("reading the live endpoint figures failed", exc_info=True)
            return {}

    def figures(self) -> dict[str, dict[str, float]]:
        shown = {}
        for name, now in self._read().items():
            before = self.baseline.get(name, {})
            figures = {key: now.get(key, 0) for key in GAUGES}
            figures.update({key: now.get(key, 0) - before.get(key, 0) for key in COUNTERS})
            if figures["in_flight"] or any(figures[key] for key in COUNTERS):
                shown[name] = figures
        return shown


def snapshot(stage: str, rows: RowsTracker, usage: dict[str, float], endpoints: dict[str, dict[str, float]],
             *, state: str = "running") -> dict[str, Any]:
    """The figures one frame of the panel (or one plain line, or ``live.json``) shows. ``state``: running,
    done or stopped. Projected spend = spent / fraction of rows done (both count what a resumed stage did
    before)."""
    total, done = rows.total, rows.done
    rate = rows.rate() if state == "running" else rows.mean_rate()
    left = max(0, total - done)
    spent = float(usage.get("cost_usd", 0.0))
    fraction = done / total if total else 1.0
    return {
        "stage": stage, "state": state, "rows_done": done, "rows_total": total, "rate": round(rate, 3),
        "elapsed_s": round(rows.elapsed(), 2),
        "eta_s": (round(left / rate, 1) if rate > 0 else None) if left else 0.0,
        "cost_usd": round(spent, 6), "projected_usd": round(spent / fraction, 6) if fraction > 0 and spent else None,
        "requests": int(usage.get("requests", 0)), "retries": int(usage.get("retries", 0)),
        "endpoints": endpoints, "updated": time.time(), "pid": os.getpid(),
    }


def real_terminal(stream) -> bool:
    """Whether ``stream`` is a real, capable terminal: a tty file descriptor and TERM not ``dumb``. Not rich's
    ``is_terminal``, which FORCE_COLOR or TTY_COMPATIBLE=1 make True on a log file too (a live panel would
    write its cursor moves there)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # StringIO, a closed or proxied stream: no terminal
        return False
    try:
        return os.isatty(fd) and os.environ.get("TERM", "").lower() != "dumb"
    except OSError:
        return False


# -- plain text ---------------------------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def money(usd: float | None) -> str:
    return "?" if usd is None else f"${usd:,.2f}" if usd >= 0.995 or usd == 0 else f"${usd:.4f}".rstrip("0")


def endpoint_text(name: str, figures: dict[str, float]) -> str:
    return (f"{name}: {int(figures.get('in_flight', 0))} in flight (window {int(figures.get('limit', 0))}), "
            f"{int(figures.get('requests', 0))} sent, {int(figures.get('rate_limited', 0))} 429s, "
            f"{int(figures.get('retries', 0))} retries")


def plain_line(snap: dict[str, Any]) -> str:
    """One log line: ``taxonomy: 12/37 rows (32%), 4.1 rows/s, 0:06 left, $0.12 spent, ~$0.37 projected; ...``"""
    total = snap["rows_total"]
    share = f" ({100 * snap['rows_done'] / total:.0f}%)" if total else ""
    if snap["state"] == "running":
        head = (f"{snap['stage']}: {snap['rows_done']}/{total} rows{share}, {snap['rate']:.1f} rows/s, "
                f"{duration(snap['eta_s'])} left, {money(snap['cost_usd'])} spent, "
                f"~{money(snap['projected_usd'])} projected")
    else:
        head = (f"{snap['stage']} {snap['state']}: {snap['rows_done']}/{total} rows{share} in "
                f"{duration(snap['elapsed_s'])} ({snap['rate']:.1f} rows/s), {money(snap['cost_usd'])} spent "
                f"({snap['requests']} requests, {snap['retries']} retries)")
    parts = [endpoint_text(name, figures) for name, figures in sorted(snap["endpoints"].items())]
    return "; ".join([head, *parts])


# -- the live file -------------------------------------------------------------------------------------------
def write_live(folder: Path, snap: dict[str, Any]) -> bool:
    """Persist ``snap`` for ``status --watch``; False (logged once by the caller) when the folder will not
    take it: a display file must never stop a run."""
    try:
        rf.atomic_write_json(folder / LIVE_FILE, snap)
        return True
    except OSError as exc:
        logger.debug("could not write %s: %s", folder / LIVE_FILE, exc)
        return False


def read_live(folder: Path, *, max_age_s: float) -> dict[str, Any] | None:
    """The running stage's last figures, None when there are none or they are older than ``max_age_s``
    (the process that wrote them is gone)."""
    try:
        snap = rf.read_json(folder / LIVE_FILE)
    except (rf.CorruptFileError, OSError):
        return None
    if not isinstance(snap, dict) or time.time() - float(snap.get("updated", 0)) > max_age_s:
        return None
    return snap


def remove_live(folder: Path) -> None:
    try:
        (folder / LIVE_FILE).unlink(missing_ok=True)
    except OSError:
        logger.debug("could not remove %s", folder / LIVE_FILE)
