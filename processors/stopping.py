"""How the command line leaves after a stop (Ctrl-C, SIGTERM, a stalled stage): exit codes, and not waiting
for ever for threads stuck in the kernel."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger("taskgalaxy")

EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # SIGTERM: 128 + SIGTERM
STOP_GRACE_S = 3.0  # after a stop, how long threads still working may take before the process leaves them


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a polite kill unwinds exactly like Ctrl-C (finished shards are kept)."""


def stop_on_sigterm(signum, frame):
    raise Terminated


def stopped(exc: KeyboardInterrupt, threads_before: set[threading.Thread]) -> int:
    """Report a Ctrl-C / SIGTERM stop and return its exit code, leaving behind threads that will not end.

    The stages stop their own workers, but a thread stuck in the kernel (a read from a hung mount, a FIFO)
    cannot be interrupted, and Python joins every such thread at exit, forever. So threads this run started get
    ``STOP_GRACE_S`` to finish; if any is still alive then, the process exits without them (the run lock is an
    ``flock`` and every shard is committed by a rename, so nothing is left half-done). A second signal during
    the wait exits at once.
    """
    code = EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    print("\ninterrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
    return leaving(code, threads_before)


def leaving(code: int, threads_before: set[threading.Thread]) -> int:
    """``code``, once the threads this run started have ended - or, after ``STOP_GRACE_S``, by leaving them
    (``os._exit``): a stalled or stopped shard may hold a thread that never returns."""
    stuck = _threads_started_since(threads_before)
    if not stuck:
        return code
    previous = _exit_at_once_on(code, signal.SIGTERM, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for thread in stuck:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = _threads_started_since(threads_before)
    if stuck:
        logger.warning("%d thread(s) still busy %.0f s after the stop (%s); exiting without waiting for them",
                       len(stuck), STOP_GRACE_S, ", ".join(sorted(t.name for t in stuck)))
        _exit_now(code)
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    return code


def _threads_started_since(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads this run started that the interpreter would join at exit: non-daemon ones, and the workers of
    every ``ThreadPoolExecutor`` (``concurrent.futures`` joins those at exit even when they are daemons, as
    they are when a pool is made on a shard's engine thread)."""
    import concurrent.futures.thread as pool_threads

    joined_at_exit = set(getattr(pool_threads, "_threads_queues", {}))
    return [t for t in threading.enumerate()
            if t not in before and t.is_alive() and (not t.daemon or t in joined_at_exit)]


def _exit_at_once_on(code: int, *signals: int) -> dict:
    """Make each of ``signals`` exit at once; returns the handlers they had."""
    return {signum: signal.signal(signum, lambda *_: _exit_now(code)) for signum in signals}


def _exit_now(code: int) -> None:
    """Leave without joining threads (``os._exit``), after flushing what we printed and logged."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
