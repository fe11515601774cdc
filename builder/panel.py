"""What ``taskgalaxy run`` shows while a stage runs: one live panel on a terminal, plain lines elsewhere.

One ``StagePanel`` per stage run (the runner opens it around the stage's shards): on a terminal a ``rich``
``Live`` table redrawn a few times a second and on every committed shard, ending in a summary frame that
stays; when stderr is no terminal (a log file, CI), one plain log line every ``interval`` seconds and a
summary line at the end. A ticker thread refreshes the spend (``stage_totals``, at most every
``SPEND_EVERY_S``) and persists the figures to ``live.json`` for ``status --watch``, with ``--no-progress``
too (mode ``"off"``: nothing drawn nor printed, the file still written). A terminal is a real one: a tty
descriptor and TERM not ``dumb`` (``builder.live.real_terminal``), whatever FORCE_COLOR says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from builder import live as lv
from builder.outputs import stage_totals

logger = logging.getLogger(__name__)

SPEND_EVERY_S = 2.0  # how often the running spend is re-read from the stage's records
LIVE_EVERY_S = 2.0  # how often live.json is rewritten
TICK_S = 0.25
JOIN_S = 5.0  # how long a stage's end waits for the ticker (a slow spend read); it writes nothing after


def render(snaps: list[dict[str, Any]], title: str = "taskgalaxy"):
    """A ``rich`` renderable of stage snapshots (``builder.live.snapshot``): a stage table, then the endpoints."""
    from rich.console import Group
    from rich.table import Table

    stages = Table(title=title, title_justify="left", expand=False)
    for column, justify in (("stage", "left"), ("state", "left"), ("rows", "right"), ("rows/s", "right"),
                            ("elapsed", "right"), ("left", "right"), ("spent", "right"), ("projected", "right")):
        stages.add_column(column, justify=justify)
    endpoints = Table(title="endpoints", title_justify="left", expand=False)
    for column in ("stage", "endpoint", "in flight", "window", "sent", "429s", "retries"):
        endpoints.add_column(column, justify="left" if column in ("stage", "endpoint") else "right")
    for snap in snaps:
        total = snap["rows_total"]
        share = f" {100 * snap['rows_done'] / total:.0f}%" if total else ""
        running = snap["state"] == "running"
        stages.add_row(snap["stage"], snap["state"], f"{snap['rows_done']}/{total}{share}", f"{snap['rate']:.1f}",
                       lv.duration(snap["elapsed_s"]), lv.duration(snap["eta_s"]) if running else "-",
                       lv.money(snap["cost_usd"]), lv.money(snap["projected_usd"]) if running else "-")
        for name, figures in sorted(snap["endpoints"].items()):
            endpoints.add_row(snap["stage"], name, *(str(int(figures.get(key, 0))) for key in
                                                     ("in_flight", "limit", "requests", "rate_limited", "retries")))
    return Group(stages, endpoints) if endpoints.row_count else stages


def stderr_console():
    """A console on stderr, or None when stderr is no real (capable) terminal: then plain lines are written.
    A real terminal is a tty descriptor (``lv.real_terminal``): FORCE_COLOR / TTY_COMPATIBLE make rich call a
    log file a terminal, and the panel's cursor moves would fill it."""
    if not lv.real_terminal(sys.stderr):
        return None
    from rich.console import Console

    console = Console(file=sys.stderr)
    return console if console.is_terminal and not console.is_dumb_terminal else None


def _same_file(first, second) -> bool:
    """Whether two streams write to the same file (stdout and stderr on one terminal)."""
    try:
        return os.path.samestat(os.fstat(first.fileno()), os.fstat(second.fileno()))
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def logging_through(stream) -> Iterator[None]:
    """Point the root logger's stream handlers that write to stderr at ``stream`` (rich's redirected stderr),
    so log lines print above the panel instead of through it."""
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream in (sys.__stderr__, sys.stderr)]
    previous = [h.setStream(stream) for h in handlers]
    try:
        yield
    finally:
        for handler, old in zip(handlers, previous):
            handler.setStream(old)


class StagePanel:
    """The live view of one stage. ``mode``: ``"auto"`` (a panel on a terminal, else plain lines), ``"plain"``
    or ``"off"`` (nothing shown; ``live.json`` is still written, for ``status --watch``). ``rows(n)`` may be
    called from any thread; ``committed(state)`` after each shard."""

    def __init__(self, stage: str, folder: Path, *, shards_total: int, rows_total: int, rows_done: int,
                 usage: dict[str, float], endpoints: lv.EndpointProvider | None = None, mode: str = "auto",
                 interval: float = 10.0):
        self.stage, self.folder, self.shards_total, self.interval = stage, folder, shards_total, interval
        self.tracker = lv.RowsTracker(rows_total, rows_done)
        self.endpoints = lv.EndpointWatch(endpoints)
        self.usage = dict(usage)
        self.console = stderr_console() if mode == "auto" else None
        self.mode = "off" if mode == "off" else "live" if self.console is not None else "plain"
        self._live = None
        self._final: dict[str, Any] | None = None  # the summary frame, once the stage has ended
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._spend_read = time.monotonic()
        self._live_written = -float("inf")  # the first tick writes live.json: a watcher sees the stage at once
        self._printed = -float("inf")
        self._lock = threading.Lock()
        self._live_file_lock = threading.Lock()  # live.json is written, and removed, under it

    def rows(self, count: int) -> None:
        self.tracker.add(count)

    def committed(self, state: dict) -> None:
        """A shard was committed: its spend is in ``state``; the panel redraws at once (a frame per shard)."""
        with self._lock:
            self.usage = dict(state["totals"].get("usage", {}))
            self._spend_read = time.monotonic()
        if self._live is not None:
            self._live.refresh()
        elif self.mode == "plain":
            self._print_due()

    def _print_due(self) -> None:
        with self._lock:  # the ticker and the runner's thread both ask: one line per interval
            now = time.monotonic()
            due = now - self._printed >= self.interval
            if due:
                self._printed = now
        if due:
            logger.info("%s", lv.plain_line(self.snapshot()))

    def snapshot(self, state: str = "running") -> dict[str, Any]:
        with self._lock:
            usage = dict(self.usage)
        return lv.snapshot(self.stage, self.tracker, usage, self.endpoints.figures(), state=state)

    # -- lifetime ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "StagePanel":
        if self.mode == "live":
            from rich.live import Live

            # stdout is drawn above the panel only when it is the panel's own terminal; redirected (a file, a
            # pipe) it stays where it goes, never swallowed into the stderr console. stderr: the log lines.
            self._live = Live(console=self.console, refresh_per_second=4, transient=False,
                              redirect_stdout=_same_file(sys.stdout, sys.stderr), redirect_stderr=True,
                              get_renderable=lambda: render([self._final or self.snapshot()]))
            self._live.start()
            self._logging = logging_through(sys.stderr)  # Live has redirected sys.stderr by now
            self._logging.__enter__()
        self._ticker = threading.Thread(target=self._tick, name=f"{self.stage}-panel", daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=JOIN_S)
        with self._live_file_lock:  # a ticker still in a slow read finds the stop flag set: it writes no more
            lv.remove_live(self.folder)
        if self.mode == "off":
            return
        self._refresh_spend(force=True)
        final = self._final = self.snapshot("stopped" if exc_type is not None else "done")
        if self._live is not None:
            self._live.refresh()  # the summary frame: it stays on the screen
            self._logging.__exit__(None, None, None)
            self._live.stop()
        else:
            (logger.warning if exc_type is not None else logger.info)("%s", lv.plain_line(final))

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self._refresh_spend()
                now = time.monotonic()
                if now - self._live_written >= LIVE_EVERY_S:
                    self._live_written = now
                    snap = self.snapshot()
                    with self._live_file_lock:
                        if self._stop.is_set():  # the stage has ended (its file may be removed): no rewrite
                            return
                        lv.write_live(self.folder, snap)
                if self.mode == "plain":
                    self._print_due()
            except Exception:  # noqa: BLE001 - a display must never stop paid work
                logger.debug("the progress panel failed to update", exc_info=True)

    def _refresh_spend(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._spend_read < SPEND_EVERY_S:
            return
        try:
            usage = stage_totals(self.folder, self.shards_total).get("usage", {})
        except Exception:  # noqa: BLE001 - a record mid-write: the next read gets it
            logger.debug("reading the running spend failed", exc_info=True)
            return
        with self._lock:
            self.usage, self._spend_read = dict(usage), time.monotonic()
