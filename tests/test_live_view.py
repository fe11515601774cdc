"""The live view of a running job, as a user sees it: ``taskgalaxy run`` in a real pseudo-terminal (a panel
that updates and leaves a clean summary), in a pipe (plain lines, no control sequences), and
``taskgalaxy status RUN --watch`` from another process, on a running and on a finished run folder.

The LLM server is the simulator, in this process: every request's first attempt gets a 429 (so the 429s and
retries columns have something to show), and a gate holds every reply until the test has seen what it waits
for - the tests wait on content, never on a sleep.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from processors.pipeline import default_responders
from processors.simulator.core import SimulatorOptions
from processors.simulator.thread import SimulatorThread

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
run: {{name: live, shard_size: 8}}
llm:
  endpoints:
    gpt4o: {{model: gpt-4o-2024-08-06, base_url: "{url}", api_key_env: null, max_concurrency: 4,
             backoff_initial_s: 0.01}}
stages:
  taxonomy: {{levels: 2, rounds_per_level: 1, children_per_request: 3, new_first_level_per_round: 1, plots: false}}
  images:
    sources: [{{type: synthetic, count: 2, seed: 0}}]
  score:
    referees:
      - {{name: tiny_llava, preset: tiny-random-llava}}
      - {{name: referee_a, preset: internvl-chat-v1.5, endpoint: {{endpoint: gpt4o}}}}
      - {{name: referee_b, preset: internvl2-26b, endpoint: {{endpoint: gpt4o}}}}
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ERASE = re.compile(r"(?:\x1b\[2K\x1b\[1A)+\x1b\[2K")  # rich's Live: back to the top of the last frame
WAIT_S = 120.0  # a deadline only: a passing run takes ~10 s


class Gate:
    """Holds every simulator reply (its event loop with it) until ``open()``: the run stays mid-stage."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def wrap(self, responder):
        def respond(messages, rng):
            self.event.wait(WAIT_S)
            return responder.respond(messages, rng)

        return replace(responder, respond=respond)

    def open(self) -> None:
        self.event.set()


@pytest.fixture
def server():
    gate = Gate()
    options = SimulatorOptions(fail_first=1, fail_kind="429", retry_after_s=0.01)
    with SimulatorThread(options, responders=[gate.wrap(r) for r in default_responders()]) as sim:
        yield sim, gate
        gate.open()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE",
                                                             "TTY_INTERACTIVE", "COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "taskgalaxy.py"), *args]


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "live.yaml"
    path.write_text(CONFIG.format(url=url))
    return path


class Pty:
    """A command on a pseudo-terminal of 140x50 cells; ``until(pattern)`` reads until its output matches."""

    def __init__(self, argv: list[str]):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 140, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=ROOT,
                                     start_new_session=True)
        os.close(slave)
        self.fd, self.data = master, b""

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    def until(self, pattern: str, deadline: float) -> re.Match:
        while True:
            match = re.search(pattern, ANSI.sub("", self.text()))
            if match:
                return match
            if not self._read(deadline):
                raise AssertionError(f"no {pattern!r} in the terminal; it shows:\n{ANSI.sub('', self.text())[-3000:]}")

    def finish(self, deadline: float) -> int:
        while self._read(deadline):
            pass
        os.close(self.fd)
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def _read(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            self.proc.kill()
            raise AssertionError(f"timed out; the terminal shows:\n{ANSI.sub('', self.text())[-3000:]}")
        ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every holder of the terminal has closed it
            return False
        self.data += chunk
        return bool(chunk)


def _lines_until(proc: subprocess.Popen, pattern: str, seen: list[str], deadline: float) -> str:
    """Read ``proc``'s stdout line by line (into ``seen``) until one matches ``pattern``."""
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return line
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no line matching {pattern!r}; got:\n{''.join(seen)}")


def _cells(frame: str, first: str) -> list[str]:
    """The cells of the table row starting with ``first`` in a rendered frame."""
    for line in ANSI.sub("", frame).splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == first and len(cells) > 2:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{ANSI.sub('', frame)}")


def test_run_in_a_terminal_updates_the_panel_and_watch_follows_it(tmp_path, server):
    sim, gate = server
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + WAIT_S
    term = Pty(_cli("run", str(_config(tmp_path, sim.base_url)), "--stages", "taxonomy", "--run-dir", str(run_dir)))
    # Mid-stage (the gate holds the replies): the panel shows requests in flight and the 429s already met.
    term.until(r"gpt4o\s*│\s*[1-9]\d*\s*│\s*\d+\s*│\s*[1-9]\d*\s*│\s*[1-9]\d*\s*│", deadline)

    # Meanwhile, from another process, reading the run folder only: the same figures, as plain lines.
    watch = subprocess.Popen(_cli("status", str(run_dir), "--watch", "--interval", "0.2"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    seen: list[str] = []
    running = _lines_until(watch, r"taxonomy: \d+/37 rows .* rows/s, .* left, .* spent.*gpt4o: [1-9]\d* in flight"
                           r".* [1-9]\d* 429s", seen, deadline)
    assert "\x1b" not in running

    gate.open()
    assert term.finish(deadline) == 0
    assert watch.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    rest = watch.stdout.read()
    assert re.search(r"taxonomy done: 37/37 rows \(100%\) in .* spent \(\d+ requests", rest), "".join(seen) + rest
    assert "total cost so far" in rest and "\x1b" not in rest

    text = term.text()
    panel, _, after = text.rpartition("\x1b[?25h")  # rich shows the cursor again when the panel ends
    frames = [f for f in ERASE.split(panel) if "rows/s" in f]
    running_frames = [ANSI.sub("", f) for f in frames if re.search(r"│ taxonomy │ running", ANSI.sub("", f))]
    rows_seen = {_cells(f, "taxonomy")[2] for f in running_frames}
    assert len(running_frames) >= 3 and len(rows_seen) >= 2, rows_seen  # the panel updated, rows moved
    assert any(re.search(r"\$0\.0*[1-9]", _cells(f, "taxonomy")[6]) for f in running_frames), "no spend shown"
    final = frames[-1]
    stage = _cells(final, "taxonomy")
    assert stage[1:3] == ["done", "37/37 100%"] and float(stage[3]) > 0 and stage[6].startswith("$")
    endpoint = _cells(final.split("endpoints")[1], "taxonomy")  # stage, endpoint, in flight, window, sent, ...
    in_flight, window, sent, limited, retries = (int(c) for c in endpoint[2:])
    assert endpoint[1] == "gpt4o" and in_flight == 0 and 1 <= window <= 4, endpoint
    assert limited == retries > 0 and sent == 2 * limited, endpoint  # each request: a 429, then its answer
    # Clean: nothing of the panel after its summary frame; the status table follows.
    assert "running" not in ANSI.sub("", final) and "total cost so far" in after and "rows/s" not in after

    # The finished folder: --watch prints the summary and exits at once; --once on a terminal, one frame.
    done = subprocess.run(_cli("status", str(run_dir), "--watch"), capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=WAIT_S)
    assert done.returncode == 0 and "\x1b" not in done.stdout
    assert re.search(r"taxonomy done: 37/37 rows .*\$0\.\d+ spent", done.stdout) and "total cost so far" in done.stdout
    once = Pty(_cli("status", str(run_dir), "--once"))
    assert once.finish(time.monotonic() + WAIT_S) == 0
    assert _cells(once.text(), "taxonomy")[1] == "done" and "total cost so far" in once.text()


def test_run_in_a_pipe_prints_plain_lines(tmp_path, server):
    sim, gate = server
    gate.open()
    proc = subprocess.run(_cli("run", str(_config(tmp_path, sim.base_url)), "--stages", "taxonomy", "--run-dir",
                               str(tmp_path / "run"), "--progress-interval", "0.05"),
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr and "\r" not in proc.stderr  # no control sequences, no bar
    progress = re.findall(r"builder\.panel: (taxonomy: \d+/37 rows .*)", proc.stderr)
    assert progress and all("rows/s" in line and "spent" in line and "projected" in line for line in progress)
    summary = re.findall(r"builder\.panel: (taxonomy done: .*)", proc.stderr)
    assert len(summary) == 1 and re.search(r"37/37 rows \(100%\).*gpt4o: 0 in flight .* [1-9]\d* 429s", summary[0])
    assert "total cost so far" in proc.stdout


def test_force_color_with_stderr_a_file_writes_plain_lines_no_control_sequences(tmp_path, server):
    """FORCE_COLOR / TTY_COMPATIBLE make rich call any stream a terminal: the panel needs a real one."""
    sim, gate = server
    gate.open()
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.run(_cli("run", str(_config(tmp_path, sim.base_url)), "--stages", "taxonomy", "--run-dir",
                                   str(tmp_path / "run"), "--progress-interval", "0.05"),
                              stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, timeout=WAIT_S,
                              env={**_env(), "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"})
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\x1b" not in text and "\r" not in text, text[:2000]
    assert re.search(r"builder\.panel: taxonomy: \d+/37 rows .*rows/s", text)
    assert re.search(r"builder\.panel: taxonomy done: 37/37 rows \(100%\)", text)
