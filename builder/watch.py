"""``taskgalaxy status RUN --watch``: the live view of a run started elsewhere, read from its run folder alone.

Each stage's figures come from its ``state.json`` and spend records (``stage_totals``, the live spend
journals of the shards in flight included) and, while it runs, from the ``live.json`` its process rewrites
every few seconds (``builder.live``: rows done, rows/s, time left, per-endpoint in flight / 429s / retries).
A run is in progress while a process holds its lock file's flock (same host) or a stage's ``live.json`` is
fresh; once none is, the watch prints the final figures and the status table and returns.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from builder import live as lv
from builder import runfolder as rf
from builder.outputs import run_states, stage_totals
from builder.runlock import run_lock_held
from builder.status import format_table, stage_summaries

STALE_S = 15.0  # live figures older than this are a stopped process's (they are rewritten every 2 s)


def run_in_progress(run_dir: Path) -> bool:
    """Whether a process holds the run: the flock on its lock file is taken (``runlock.run_lock_held``: the lock
    itself, never the pid the file names, which a killed run leaves behind and the OS may reuse), or a stage's
    live figures are fresh (a run on another host that shares the folder)."""
    if run_lock_held(run_dir):
        return True
    return any(lv.read_live(run_dir / state["folder"], max_age_s=STALE_S) for state in run_states(run_dir))


def folder_snapshots(run_dir: Path, *, running: bool) -> list[dict[str, Any]]:
    """One ``builder.live.snapshot``-shaped dict per stage of the run folder, in pipeline order."""
    snaps = []
    for state in run_states(run_dir):
        folder = run_dir / state["folder"]
        totals = stage_totals(folder, state.get("shards_total", 0))
        usage = totals.get("usage", {})
        live = None if state.get("done") else lv.read_live(folder, max_age_s=STALE_S)
        if live is not None:  # the running process's figures; the spend as the records hold it now
            spent = float(usage.get("cost_usd", live.get("cost_usd", 0.0)))
            fraction = live["rows_done"] / live["rows_total"] if live.get("rows_total") else 1.0
            snaps.append({**live, "cost_usd": spent, "requests": int(usage.get("requests", 0)),
                          "retries": int(usage.get("retries", 0)),
                          "projected_usd": spent / fraction if fraction > 0 and spent else None})
            continue
        seconds = float(totals.get("seconds", 0.0))
        done = state.get("done")
        snaps.append({
            "stage": state["stage"], "state": "done" if done else "running" if running else "stopped",
            "rows_done": totals["rows_in"], "rows_total": state.get("rows_in", 0),
            "rate": round(totals["rows_in"] / seconds, 3) if seconds else 0.0, "elapsed_s": seconds,
            "eta_s": 0.0 if done else None, "cost_usd": float(usage.get("cost_usd", 0.0)),
            "projected_usd": None, "requests": int(usage.get("requests", 0)),
            "retries": int(usage.get("retries", 0)), "endpoints": {},
        })
    return snaps


def watch(run_dir: Path, *, interval: float = 2.0, once: bool = False, out: TextIO | None = None) -> int:
    """Show the run's figures every ``interval`` seconds until it is no longer in progress (``once``: one
    frame); a live panel when ``out`` is a terminal, plain lines otherwise. Ctrl-C leaves with 0."""
    out = out if out is not None else sys.stdout
    from rich.console import Console

    console = Console(file=out)
    terminal = lv.real_terminal(out) and console.is_terminal and not console.is_dumb_terminal
    try:
        if terminal:
            _watch_panel(run_dir, console, interval, once)
        else:
            _watch_lines(run_dir, out, interval, once)
    except KeyboardInterrupt:
        return 0
    print(format_table(run_dir, stage_summaries(run_dir)), file=out)
    return 0


def _watch_panel(run_dir: Path, console, interval: float, once: bool) -> None:
    from rich.live import Live

    from builder.panel import render

    title = f"run {run_dir}"
    running = run_in_progress(run_dir)
    with Live(render(folder_snapshots(run_dir, running=running), title), console=console, auto_refresh=False,
              transient=False) as view:
        while running and not once:
            time.sleep(interval)
            running = run_in_progress(run_dir)
            view.update(render(folder_snapshots(run_dir, running=running), title), refresh=True)


def _watch_lines(run_dir: Path, out: TextIO, interval: float, once: bool) -> None:
    running = run_in_progress(run_dir)
    while True:
        stamp = time.strftime("%H:%M:%S")
        snaps = folder_snapshots(run_dir, running=running)
        shown = [s for s in snaps if s["state"] == "running"] if running and not once else snaps
        for snap in shown:
            print(f"{stamp} {lv.plain_line(snap)}", file=out, flush=True)
        if once or not running:
            return
        time.sleep(interval)
        running = run_in_progress(run_dir)
        once = not running  # the run ended meanwhile: every stage's final figures, once
