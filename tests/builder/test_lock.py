"""A second run on the same folder is refused with a clear message; a killed run never blocks the next."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.runlock import RunLock, RunLockedError
from toy_run import make_runner

TOY_RUN = Path(__file__).parent.parent / "toy_run.py"
CONFIG = {"run": {"name": "toy", "shard_size": 4}, "stages": {"numbers": {"count": 8}}}


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunLockedError, match=rf"run folder {run} is in use by pid {os.getpid()}"):
            make_runner(run, CONFIG).run()
    make_runner(run, CONFIG).run()  # free again once the first one is gone


def test_second_process_is_refused_and_a_killed_holder_releases_the_lock(tmp_path):
    run, log, hold = tmp_path / "run", tmp_path / "calls.log", tmp_path / "hold"
    hold.touch()  # the first run stays inside its first shard until this file goes
    config = {**CONFIG, "stages": {"numbers": {"count": 8}, "square": {"hold_while": str(hold), "calls_log": str(log)}}}
    first = subprocess.Popen([sys.executable, str(TOY_RUN), str(run), json.dumps(config)])
    try:
        deadline = time.monotonic() + 60
        while not log.exists():
            assert time.monotonic() < deadline and first.poll() is None, "first run never started"
            time.sleep(0.02)
        second = subprocess.run([sys.executable, str(TOY_RUN), str(run), json.dumps(config)],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"is in use by pid {first.pid}" in second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    hold.unlink()
    make_runner(run, config).run()  # the killed holder's lock died with it


def test_a_killed_run_whose_forked_worker_lives_on_does_not_keep_the_folder_locked(tmp_path):
    # The match stage's DataLoader workers are forked; one that outlives a SIGKILLed run by a few seconds held
    # the run lock (a flock lives while any copy of its descriptor is open) and the resume was refused.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from builder.runlock import RunLock
        RunLock(Path({str(tmp_path / 'run')!r})).acquire()
        child = os.fork()
        if child == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # let the test read its parent's output to the end
            os.dup2(devnull, 2)
            time.sleep(20)  # a worker that has not noticed its parent died
            os._exit(0)
        print(child, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    worker = int(proc.stdout.split()[0])
    try:
        os.kill(worker, 0)  # the forked worker is still alive...
        with RunLock(tmp_path / "run"):  # ...and the folder can be locked by the resume
            pass
    finally:
        os.kill(worker, signal.SIGKILL)
