"""Kill it anywhere, fault it everywhere: the demo pipeline against a faulty simulator, SIGKILLed and resumed.

    .venv/bin/python scripts/chaos.py --seed 0 --kills 6        # ~2-4 minutes on 2 cores
    .venv/bin/python scripts/chaos.py --seed 1 --kills 2 --quick  # the short version the test suite runs

Two simulators run in their own processes (so their counters outlive every kill): a clean one, and one that
injects 429s with Retry-After (20%), 5xx (5%), timeouts (2%), dropped connections (2%) and malformed JSON
(5%); the simulated filter model also invents labels (10%). The demo config (`configs/demo.yaml`) runs as a
*real* run (not --dry-run) against each, with a distinctive fake API key that the faulty simulator checks. The
faulty run is SIGKILLed at K random moments spread over the stages and resumed each time, then compared with
the clean run:

- identical: the final samples (qa_id, votes, p_yes) equal the clean run's;
- unaccounted: stages where rows in != rows processed, or whose rows out / failures by reason differ from the
  clean run's (faults are retried until they pass, so both runs must agree);
- paid_twice: requests answered more than ``--in-flight-s`` before a kill and paid for again (must be 0);
  in_flight_repaid counts the ones answered while a kill landed (the client never got them), apart;
- leaks: files under the run folder, its cache, the logs or the Hub folder that hold the fake key.

Then a referee server that refuses its model name for a while (vLLM's 404 for a wrong ``--served-model-name``)
and is then fixed: the clean run's score and final stages are computed again against a simulator that serves
every model but referee_b's. The run must stop with exit 75 and the refused questions unjudged (never sealed as
failures); after the server is fixed, the same command must judge exactly those (nothing answered is asked
again) and give the clean run's dataset: ``refused_then_fixed=1``.

Last line: ``identical=1 unaccounted=0 paid_twice=0 kills=K leaks=0 in_flight_repaid=N refused_then_fixed=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "taskgalaxy"]
KEY_ENV = "TG_CHAOS_API_KEY"
FAULTS = ["--rate-429", "0.2", "--retry-after-s", "0.2", "--rate-5xx", "0.05", "--rate-timeout", "0.02",
          "--hang-s", "3", "--rate-drop", "0.02", "--rate-malformed", "0.05"]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_simulator(work: Path, name: str, args: list[str], key: str, port: int) -> tuple[subprocess.Popen, str]:
    log = open(work / f"sim-{name}.log", "w")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*CLI, "simulate-api", "--api-key", key, "--port", str(port), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        raise SystemExit(f"simulator {name} did not start; see {work / f'sim-{name}.log'}")
    return proc, url


def sim_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_sim/stats", timeout=10) as response:
        return json.loads(response.read())["stats"]


def write_config(work: Path, name: str, url: str, *, quick: bool) -> Path:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "configs" / "seeds", folder / "seeds", dirs_exist_ok=True)
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    fast = {"base_url": url, "timeout_s": 1.5, "max_retries": 12, "backoff_initial_s": 0.05, "backoff_max_s": 1.0}
    for endpoint in config["llm"]["endpoints"].values():
        endpoint.update(fast)
        endpoint.setdefault("api_key_env", KEY_ENV)
    config["llm"]["endpoints"]["gpt4o"]["api_key_env"] = KEY_ENV
    for endpoint in ("referee_a", "referee_b"):
        config["llm"]["endpoints"][endpoint]["api_key_env"] = KEY_ENV
    config["llm"]["breaker"] = {"consecutive_failures": 1000}  # faults are the point here
    if quick:
        config["stages"]["images"]["sources"][0]["count"] = 24
        config["stages"]["taxonomy"]["levels"] = 2
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_pipeline(config: Path, run_dir: Path, env: dict, log: Path, kill_after: float | None) -> tuple[int, float]:
    """One attempt; with ``kill_after``, SIGKILL it then (unless it ended first). Returns (exit code, kill time)."""
    with open(log, "a") as out:
        proc = subprocess.Popen([*CLI, "run", str(config), "--run-dir", str(run_dir)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        if kill_after is None:
            return proc.wait(), 0.0
        try:
            return proc.wait(timeout=kill_after), 0.0
        except subprocess.TimeoutExpired:
            killed_at = time.time()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return -9, killed_at


def status(run_dir: Path, env: dict) -> dict[str, dict]:
    out = subprocess.run([*CLI, "status", str(run_dir), "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    return {s["stage"]: s for s in json.loads(out.stdout)}


def stage_in_progress(run_dir: Path, env: dict) -> str:
    """The stage a kill interrupted: the first one not done (``start`` before any stage began)."""
    if not run_dir.exists():
        return "start"
    try:
        stages = status(run_dir, env)
    except subprocess.CalledProcessError:
        return "start"
    return next((name for name, s in stages.items() if not s["done"]), "start" if not stages else "between")


def final_rows(run_dir: Path) -> list[tuple]:
    sys.path.insert(0, str(ROOT))
    from builder.outputs import load_stage_output

    rows = load_stage_output(run_dir, "final").to_list()
    return sorted((r["qa_id"], json.dumps(r.get("votes"), sort_keys=True),
                   json.dumps({k: round(v, 5) for k, v in (r.get("p_yes") or {}).items() if v is not None},
                              sort_keys=True)) for r in rows)


def leaks(key: str, folders: list[Path]) -> list[str]:
    needle = key.encode()
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    if needle in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    continue
    return found


def paid_twice(chaos: dict, clean: dict, kills: list[float], in_flight_s: float) -> tuple[int, int]:
    """(answers paid again after a kill though answered well before it, answers repaid that a kill caught).

    Replies are deterministic per request, so the clean run says how often each request is answered when
    nothing is killed (more than once where a reply was unusable and asked again). Every answer beyond that
    count in the chaos run was paid again because of a kill: in flight if the previous answer came less than
    ``in_flight_s`` before a kill (the client never got it), else a request that was paid twice."""
    twice = flight = 0
    clean_counts = clean.get("ok_per_key", {})
    for key, times in chaos.get("answered_at", {}).items():
        extra = len(times) - clean_counts.get(key, 0)
        for first in times[:-1][-extra:] if extra > 0 else []:
            if any(0 <= kill - first <= in_flight_s for kill in kills):
                flight += 1
            else:
                twice += 1
    return twice, flight


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a smaller demo (the test suite's short run)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new one under runs/)")
    parser.add_argument("--in-flight-s", type=float, default=0.25,
                        help="an answer sent this close before a kill counts as in flight: it can only have been "
                             "lost on the wire (the old cache buffered up to 0.5 s of answers, which this catches)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.work or ROOT / "runs" / f"chaos-{args.seed}-{int(time.time())}"
    work.mkdir(parents=True, exist_ok=True)
    key = f"sk-chaos-FAKE-{rng.getrandbits(64):016x}-DO-NOT-LEAK"
    env = {**os.environ, KEY_ENV: key, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    # Both simulators serve the same address, one after the other: the request cache keys hold the server's
    # URL, so the clean run's per-request counts then line up with the faulty run's.
    port = free_port()
    clean_sim, clean_url = start_simulator(work, "clean", ["--seed", str(args.seed)], key, port)
    faulty_sim = None
    try:
        clean_dir, chaos_dir = work / "clean" / "run", work / "chaos" / "run"
        started = time.monotonic()
        code, _ = run_pipeline(write_config(work, "clean", clean_url, quick=args.quick), clean_dir, env,
                               work / "clean.log", None)
        clean_seconds = time.monotonic() - started
        if code != 0:
            raise SystemExit(f"the clean run failed (exit {code}); see {work / 'clean.log'}")
        clean_stats = sim_stats(clean_url)
        clean_sim.terminate()
        clean_sim.wait(timeout=10)
        faulty_sim, faulty_url = start_simulator(work, "faulty", ["--seed", str(args.seed), *FAULTS], key, port)
        config = write_config(work, "chaos", faulty_url, quick=args.quick)
        kill_times: list[float] = []
        killed_in: list[str] = []
        attempts = 0
        while len(kill_times) < args.kills and attempts < args.kills * 4:
            attempts += 1
            # Spread the kills over the whole run: each attempt gets a random share of the clean run's time
            # (plus start-up), so early attempts die in the first stages and later ones further on.
            code, killed_at = run_pipeline(config, chaos_dir, env, work / "chaos.log",
                                           rng.uniform(3.0, max(4.0, 0.5 * clean_seconds)))
            if killed_at:
                kill_times.append(killed_at)
                killed_in.append(stage_in_progress(chaos_dir, env))
            elif code == 0:
                break  # it finished before the kill: nothing left to interrupt
        code, _ = run_pipeline(config, chaos_dir, env, work / "chaos.log", None)
        for _ in range(3):  # a row whose retries all met faults is not judged: the same command asks it again
            if code != EXIT_UNANSWERED:
                break
            code, _ = run_pipeline(config, chaos_dir, env, work / "chaos.log", None)
        if code != 0:
            raise SystemExit(f"the resumed chaos run failed (exit {code}); see {work / 'chaos.log'}")

        clean, chaos = status(clean_dir, env), status(chaos_dir, env)
        unaccounted = []
        for name, summary in chaos.items():
            other = clean.get(name, {})
            if not summary["done"] or summary["rows_processed"] != summary["rows_in"]:
                unaccounted.append(f"{name}: {summary['rows_processed']} of {summary['rows_in']} rows processed")
            elif (summary["rows_out"], summary["failures_by_reason"]) != (other.get("rows_out"),
                                                                         other.get("failures_by_reason")):
                unaccounted.append(f"{name}: out {summary['rows_out']} {summary['failures_by_reason']} vs clean "
                                   f"{other.get('rows_out')} {other.get('failures_by_reason')}")
        identical = final_rows(chaos_dir) == final_rows(clean_dir)
        hub = work / "hub"
        subprocess.run([*CLI, "push", str(chaos_dir), "--local-dir", str(hub)], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        leaked = leaks(key, [work / "chaos", work / "clean", hub, *work.glob("*.log")])
        chaos_stats = sim_stats(faulty_url)
        (work / "sim-stats.json").write_text(json.dumps({"chaos": chaos_stats, "clean": clean_stats,
                                                          "kills": kill_times}))
        twice, flight = paid_twice(chaos_stats, clean_stats, kill_times, args.in_flight_s)
        faulty_sim.terminate()
        faulty_sim.wait(timeout=10)
        faulty_sim = None
        refused_ok, refused_note = refused_then_fixed(work, port, key, env, clean_dir, args.seed)
    finally:
        for proc in (clean_sim, faulty_sim):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    for line in unaccounted:
        print(f"unaccounted: {line}", file=sys.stderr)
    for path in leaked:
        print(f"leak: {path}", file=sys.stderr)
    print(f"work folder: {work}; clean run {clean_seconds:.0f} s; kills during: {', '.join(killed_in)}",
          file=sys.stderr)
    if not refused_ok:
        print(f"refused then fixed: {refused_note}", file=sys.stderr)
    print(f"identical={int(identical)} unaccounted={len(unaccounted)} paid_twice={twice} kills={len(kill_times)} "
          f"leaks={len(leaked)} in_flight_repaid={flight} refused_then_fixed={int(refused_ok)}")
    return 0 if identical and not unaccounted and not twice and not leaked and refused_ok else 1


EXIT_UNANSWERED = 75  # builder.runner.EXIT_UNANSWERED: rows a server did not answer, asked again by a rerun
REFUSED_MODEL = "internvl2-26b"  # referee_b's model in configs/demo.yaml


def refused_then_fixed(work: Path, port: int, key: str, env: dict, clean_dir: Path, seed: int) -> tuple[bool, str]:
    """The clean run's score and final, again, against a server that refuses referee_b's model name, then
    against the fixed server. (ok, what went wrong)."""
    config = work / "clean" / "config.yaml"
    run_dir = work / "refused" / "run"
    shutil.copytree(clean_dir, run_dir)
    for folder in [*run_dir.glob("[0-9][0-9]_score"), *run_dir.glob("[0-9][0-9]_final")]:
        shutil.rmtree(folder)
    for cache in (run_dir / "cache").glob("llm-requests*"):  # every referee question goes to the server again
        cache.unlink()
    served = sorted({e["model"] for e in yaml.safe_load(config.read_text())["llm"]["endpoints"].values()}
                    - {REFUSED_MODEL})
    log = work / "refused.log"
    sim, url = start_simulator(work, "refusing", ["--seed", str(seed), "--served-models", ",".join(served)], key, port)
    try:
        code, _ = run_pipeline(config, run_dir, env, log, None)
        refused = sim_stats(url).get("outcomes", {})
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    score = status(run_dir, env).get("score", {})
    unjudged = (score.get("failures_by_reason") or {}).get("vote_unanswered", 0)
    if code != EXIT_UNANSWERED or score.get("done") or not unjudged:
        return False, f"against the refusing server: exit {code}, score done={score.get('done')}, " \
                      f"vote_unanswered={unjudged} (want exit {EXIT_UNANSWERED}, not done, > 0); see {log}"
    sim, url = start_simulator(work, "fixed", ["--seed", str(seed)], key, port)
    try:
        code, _ = run_pipeline(config, run_dir, env, log, None)
        asked_again = len(sim_stats(url).get("ok_per_key", {}))  # distinct requests the fixed server answered
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    if code != 0:
        return False, f"after the fix: exit {code}; see {log}"
    if final_rows(run_dir) != final_rows(clean_dir):
        return False, "after the fix the final samples differ from the clean run's"
    if not 0 < asked_again <= unjudged:  # more: an answer the refusing server gave was paid for again
        return False, f"after the fix {asked_again} requests were answered, but {unjudged} were unjudged " \
                      f"(the refusing server answered {refused})"
    return True, ""


if __name__ == "__main__":
    sys.exit(main())
