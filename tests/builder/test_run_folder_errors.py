"""A run folder that cannot be used (full disk, read-only, /proc, damaged files) and bad seeds stop with one
paragraph naming what failed, the path, the stage and the fix, and an exit code that fits — not a bare
OSError / JSONDecodeError with exit 1.

Full disks are simulated by a write that raises ``ENOSPC``; read-only folders by a write that raises ``EROFS``
or, for commands that only read, by a real read-only bind mount in a private mount namespace (``unshare -m``,
as root) or by ``chmod`` (as another user). Root ignores ``chmod``, hence the mount.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import runfolder as rf
from builder.config import build_config_model, validate_config
from builder.runner import Runner
from taskgalaxy import main
from toy_llava_run import finished_llava_run
from toy_stages import Numbers, Square

REPO = Path(__file__).resolve().parents[2]


class SummarizingSquare(Square):
    """The toy square stage plus a finalize that writes a summary file, as real stages do."""

    def finalize(self, config, ctx, output):
        rf.atomic_write_json(ctx.stage_dir / "summary.json", {"rows": len(output)})


def _runner(run_dir: Path, calls_log: Path) -> Runner:
    stages = [Numbers(), SummarizingSquare()]
    config = validate_config({"run": {"name": "toy", "shard_size": 4},
                              "stages": {"numbers": {"count": 8}, "square": {"calls_log": str(calls_log)}}},
                             build_config_model(stages), base_dir=run_dir.parent)
    return Runner(stages, config, run_dir, progress=False)


def _fail_writes_to(monkeypatch, name: str, code: int) -> None:
    real = rf.atomic_write_bytes

    def write(path, data):
        if Path(path).name == name:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, data)

    monkeypatch.setattr(rf, "atomic_write_bytes", write)


def test_a_full_disk_in_finalize_names_the_stage_the_file_and_the_fix(tmp_path, monkeypatch):
    run_dir, log = tmp_path / "run", tmp_path / "calls.log"
    _fail_writes_to(monkeypatch, "summary.json", errno.ENOSPC)
    with pytest.raises(rf.RunFolderError) as caught:
        _runner(run_dir, log).run()
    message = str(caught.value)
    assert caught.value.exit_code == rf.EXIT_IO
    assert message.startswith("stage 'square': could not finish the stage (finalize")
    assert str(run_dir / "01_square" / "summary.json") in message
    assert "the disk is full" in message and "Free space" in message and "rerun the same command" in message
    monkeypatch.undo()  # space freed: the rerun finishes without recomputing a shard
    calls = log.read_text().split()
    _runner(run_dir, log).run()
    assert log.read_text().split() == calls
    assert json.loads((run_dir / "01_square" / "summary.json").read_text()) == {"rows": 8}


@pytest.mark.parametrize("where", ["engine", "commit"])
def test_a_full_disk_mid_stage_names_the_stage_and_keeps_finished_shards(tmp_path, monkeypatch, where):
    import builder.engine as engine_module
    import builder.runner as runner_module

    run_dir, log = tmp_path / "run", tmp_path / "calls.log"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "engine":  # Dataset.map writing its cache file, or the batch function writing a file
        real_execute = engine_module.execute_shard

        def execute_shard(fn, task, **kwargs):
            if "01_square" in str(task.tmp_path) and task.tmp_path.name.endswith("-00001.arrow"):
                def full_disk(batch):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(task.tmp_path))
                return real_execute(full_disk, task, **kwargs)
            return real_execute(fn, task, **kwargs)

        monkeypatch.setattr(engine_module, "execute_shard", execute_shard)
    else:  # the runner committing shard 1 of square
        real_write = runner_module.write_arrow_table

        def write(path, table, features=None):
            if "01_square" in str(path) and Path(path).name.endswith("shard-00001.arrow"):
                raise full
            return real_write(path, table, features)

        monkeypatch.setattr(runner_module, "write_arrow_table", write)
    with pytest.raises(rf.RunFolderError) as caught:
        _runner(run_dir, log).run()
    message = str(caught.value)
    assert caught.value.exit_code == rf.EXIT_IO and message.startswith("stage 'square': could not write")
    assert str(run_dir / "01_square") in message and "the disk is full" in message and "Free space" in message
    monkeypatch.undo()
    _runner(run_dir, log).run()
    assert log.read_text().split().count("n00000") == 1, "a finished shard was computed again"


@pytest.mark.parametrize("call", ["open", "pwrite"])
def test_a_full_disk_when_creating_the_run_lock_says_so_and_that_nothing_ran(tmp_path, monkeypatch, call):
    real = getattr(os, call)

    def full(path_or_fd, *args, **kwargs):
        if call == "pwrite" or str(path_or_fd).endswith(rf.LOCK_FILE):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path_or_fd, *args, **kwargs)

    monkeypatch.setattr(os, call, full)
    run_dir, log = tmp_path / "run", tmp_path / "calls.log"
    with pytest.raises(rf.RunFolderError) as caught:
        _runner(run_dir, log).run()
    assert caught.value.exit_code == rf.EXIT_UNUSABLE
    message = str(caught.value)
    assert f"could not create the run lock before any stage ran ({run_dir / rf.LOCK_FILE})" in message
    assert "the disk is full" in message and "Free space" in message and message.endswith("Nothing was run.")
    assert not log.exists()


def test_a_read_only_run_folder_refuses_a_run_with_what_to_do(tmp_path, monkeypatch):
    run_dir, log = tmp_path / "run", tmp_path / "calls.log"
    _runner(run_dir, log).run()  # a finished run, then its disk is remounted read-only
    real = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(rf.RunFolderError) as caught:
        _runner(run_dir, log).run()
    message = str(caught.value)
    assert caught.value.exit_code == rf.EXIT_UNUSABLE
    assert str(run_dir / rf.LOCK_FILE) in message and "the file system is read-only" in message
    assert "copy the run folder to a writable disk and pass --run-dir" in message
    assert "`status`, `export` and `push` only read" in message


def test_a_run_folder_under_proc_is_refused_before_anything_is_created(tmp_path):
    if rf.pseudo_filesystem(Path("/proc")) is None:
        pytest.skip("/proc is not a proc file system here")
    run_dir = Path("/proc/taskgalaxy-test/run")
    with pytest.raises(rf.RunFolderError) as caught:
        _runner(run_dir, tmp_path / "calls.log").run()
    assert caught.value.exit_code == rf.EXIT_UNUSABLE
    message = str(caught.value)
    assert f"the run folder {run_dir} would lie on the kernel's 'proc' pseudo file system" in message
    assert "nothing was run" in message and "a folder on a real disk" in message


def test_status_of_a_run_with_a_corrupt_state_json_names_the_file_and_the_fix(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _runner(run_dir, tmp_path / "calls.log").run()
    state = run_dir / "01_square" / rf.STATE_FILE
    state.write_text('{"stage": "square", "fingerp')
    assert main(["status", str(run_dir)]) == rf.EXIT_DATA
    err = capsys.readouterr().err
    assert err.startswith(f"error: stage 'square': {state} is damaged: it is not valid JSON")
    assert "Rerun `taskgalaxy run` with the same config: it rebuilds this file" in err
    assert "Traceback" not in err and err.count("\n") == 1  # one paragraph


SEED_CONFIG = """
run: {name: seeds}
llm:
  endpoints:
    gpt4o: {model: gpt-4o-2024-08-06}
    referee_a: {base_url: "http://localhost:9/v1", api_key_env: null, model: internvl-chat-v1.5}
stages:
  taxonomy: {seeds: seeds.txt, levels: 2}
  images: {sources: [{type: synthetic, count: 4, seed: 3}]}
  score: {referees: [{name: referee_a, preset: internvl-chat-v1.5, endpoint: {endpoint: referee_a}}]}
  final: {threshold: 1}
"""


def test_bad_seeds_exit_2_and_leave_no_run_folder(tmp_path, capsys):
    (tmp_path / "seeds.txt").write_bytes(b"OCR~Scene text\nOCR~Bad\x07name\n")
    (tmp_path / "seeds.yaml").write_text(SEED_CONFIG)
    run_dir = tmp_path / "run"
    code = main(["run", str(tmp_path / "seeds.yaml"), "--dry-run", "--run-dir", str(run_dir), "--stages", "taxonomy",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: config error: stages.taxonomy.seeds:" in err and "line 2: control character" in err
    assert "nothing was run" in err
    assert not run_dir.exists(), "a run folder was created although nothing was run"


READ_ONLY_SCRIPT = """
import json, sys
sys.path[:0] = {paths!r}
from taskgalaxy import main
from toy_llava_run import STAGES
result = {{"status": main(["status", {run!r}]), "export": main(["export", {run!r}, "--llava", {out!r}]),
           "push": main(["push", {run!r}, "--local-dir", {hub!r}])}}
from builder.config import build_config_model, validate_config
from builder.runner import Runner
settings = {{"run": {{"name": "llava", "shard_size": 2}}, "stages": {{"images": {{"folder": {pictures!r}}}}}}}
config = validate_config(settings, build_config_model(STAGES), base_dir={base!r})
try:
    Runner(STAGES, config, {run!r}, progress=False).run()
except Exception as exc:  # noqa: BLE001 - the test reads what it was
    result["run"] = [getattr(exc, "exit_code", None), f"{{type(exc).__name__}}: {{exc}}"]
print("RESULT " + json.dumps(result))
"""


def _read_only_command(run_dir: Path, script: str) -> list[str] | None:
    """A command that runs ``script`` with ``run_dir`` read-only, or None where this machine cannot."""
    if os.geteuid() != 0:  # chmod binds everyone but root
        subprocess.run(["chmod", "-R", "a-w", str(run_dir)], check=True)
        return [sys.executable, "-c", script]
    if shutil.which("unshare") is None:
        return None
    mount = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && echo MOUNTED && exec "$2" -c "$3"'
    return ["unshare", "-m", "sh", "-c", mount, "sh", str(run_dir), sys.executable, script]


def test_status_export_and_push_of_a_finished_run_work_in_a_read_only_folder(tmp_path):
    run_dir = finished_llava_run(tmp_path)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    script = READ_ONLY_SCRIPT.format(paths=[str(REPO / "tests"), str(REPO / "tests" / "builder"), str(REPO)],
                                     run=str(run_dir), out=str(tmp_path / "export" / "data.json"),
                                     hub=str(tmp_path / "hub"), pictures=str(tmp_path / "pictures"),
                                     base=str(tmp_path))
    command = _read_only_command(run_dir, script)
    if command is None:
        pytest.skip("running as root without `unshare`: no way to make a folder read-only for this process")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    if os.geteuid() == 0 and "MOUNTED" not in done.stdout:
        pytest.skip(f"a read-only bind mount is not allowed here: {done.stderr.strip()[-200:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert (result["status"], result["export"], result["push"]) == (0, 0, 0), done.stderr[-3000:]
    assert len(json.loads((tmp_path / "export" / "data.json").read_text())) == 3
    assert (tmp_path / "hub" / "final" / "train-00000-of-00001.parquet").exists()
    code, message = result["run"]
    assert code == rf.EXIT_UNUSABLE and "read-only" in message and "`status`, `export` and `push` only read" in message
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


class SettledSquare(SummarizingSquare):
    """The square stage with a settle step (as the images stage's duplicate ledger), which can hit a full disk."""

    full_disk_at: int | None = None  # the settle call (0-based) that raises ENOSPC

    def make_settle_fn(self, config, ctx):
        calls = []

        def settle(table):
            calls.append(len(table))
            if len(calls) - 1 == SettledSquare.full_disk_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(ctx.stage_dir / "ledger"))
            return table, {}

        return settle


def test_a_full_disk_in_a_settle_step_names_the_stage_and_the_rerun_resumes(tmp_path, monkeypatch):
    run_dir, log = tmp_path / "run", tmp_path / "calls.log"

    def runner() -> Runner:
        stages = [Numbers(), SettledSquare()]
        config = validate_config({"run": {"name": "toy", "shard_size": 4},
                                  "stages": {"numbers": {"count": 8}, "square": {"calls_log": str(log)}}},
                                 build_config_model(stages), base_dir=run_dir.parent)
        return Runner(stages, config, run_dir, progress=False)

    monkeypatch.setattr(SettledSquare, "full_disk_at", 1)  # the second shard's settle
    with pytest.raises(rf.RunFolderError) as caught:
        runner().run()
    message = str(caught.value)
    assert caught.value.exit_code == rf.EXIT_IO and message.startswith("stage 'square':")
    assert "the disk is full" in message and "Free space" in message
    assert (run_dir / "01_square" / rf.shard_name(0)).exists()  # settled and committed before the full disk
    assert not (run_dir / "01_square" / rf.shard_name(1)).exists()
    monkeypatch.setattr(SettledSquare, "full_disk_at", None)  # space freed
    runner().run()
    calls = log.read_text().split()
    assert calls.count("n00000") == 1, "the committed shard was computed again"
    assert json.loads((run_dir / "01_square" / "summary.json").read_text()) == {"rows": 8}
