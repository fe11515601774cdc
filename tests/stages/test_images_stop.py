"""The images stage through the real command line, in a subprocess: a FIFO in an image folder fails its row
instead of hanging the run, and SIGTERM / Ctrl-C stop a stage whose worker is stuck within seconds.

Subprocesses, because the failures these guard against are hangs: in-process they would hang the test run.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 60  # a generous ceiling on a loaded 2-core machine (a run takes ~1 s); a hang is what it catches


def write_config(base: Path, **images) -> Path:
    """The offline demo config with the images stage replaced (the other stages only need to validate)."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["run"] = {"name": "stop-test"}
    taxonomy = config["stages"]["taxonomy"]
    taxonomy.pop("seeds", None)  # the shipped seeds (package data)
    config["stages"]["images"] = {"sources": [{"type": "folder", "root": str(base / "photos")}], **images}
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def photos(base: Path, count: int = 3) -> Path:
    folder = base / "photos"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (48, 32), (40 * i, 10, 200 - 40 * i)).save(folder / f"{i}.png")
    return folder


def cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "taskgalaxy.py"), *args]


def test_a_fifo_in_the_image_folder_fails_its_row_and_the_run_finishes(tmp_path):
    os.mkfifo(photos(tmp_path) / "pipe.jpg")
    config = write_config(tmp_path, workers=2)
    done = subprocess.run(cli("run", str(config), "--stages", "images", "--no-progress", "--run-dir",
                              str(tmp_path / "run")), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    status = subprocess.run(cli("status", str(tmp_path / "run"), "--json"), capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    images = json.loads(status.stdout)[0]
    assert images["rows_out"] == 3 and images["failures_by_reason"] == {"image_not_regular_file": 1}


BLOCKING_RUN = """
import signal, sys, threading
sys.path.insert(0, {repo!r})
import taskgalaxy
import processors.stages.images as images

import processors.stopping
processors.stopping.STOP_GRACE_S = 1.0
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even if the test runner ignores SIGINT

first = threading.Lock()

def stuck(data, limits, name="image"):  # a read that never returns, like one from a hung network mount
    if first.acquire(blocking=False):  # one line for the test, however many workers get stuck
        print("blocked", flush=True)
    threading.Event().wait()

images.check_image = stuck
sys.exit(taskgalaxy.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_a_stuck_images_stage_within_seconds(tmp_path, signum, code):
    photos(tmp_path)
    config = write_config(tmp_path, workers=2)
    script = tmp_path / "blocking_run.py"
    script.write_text(BLOCKING_RUN.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script), "run", str(config), "--stages", "images", "--no-progress",
                             "--run-dir", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], RUN_TIMEOUT_S)  # wait until a worker is stuck
        assert ready and proc.stdout.readline().strip() == "blocked", proc.stderr.read() if proc.poll() else ""
        sent = time.monotonic()
        proc.send_signal(signum)
        returncode = proc.wait(timeout=15)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert returncode == code, stderr
    assert waited < 10, f"took {waited:.1f} s to stop"
    assert "interrupted: finished shards are kept" in stderr and "Traceback" not in stderr
