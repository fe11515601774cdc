"""The short chaos run (issue 13): the demo against a faulty simulator, SIGKILLed twice and resumed, must give
the clean run's dataset, account for every row, pay no answered request twice and leak no key; and a referee
server that refuses its model name, then is fixed, gets the refused questions judged on the rerun (issue 20).

`scripts/chaos.py` is the full version (more kills, the full demo); this runs its quick form (~30 s here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_chaos_run(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--seed", "1", "--kills", "2",
                          "--quick", "--work", str(tmp_path / "chaos")], capture_output=True, text=True,
                         timeout=400, cwd=ROOT)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    logs = "".join(f"\n--- {log.name}:\n{log.read_text()[-2000:]}" for log in sorted((tmp_path / "chaos").glob("*.log")))
    figures = dict(pair.split("=") for pair in last.split())
    assert figures.get("kills") == "2", (last, out.stderr[-3000:], logs)
    assert (figures["identical"], figures["unaccounted"], figures["paid_twice"], figures["leaks"],
            figures["refused_then_fixed"]) == ("1", "0", "0", "0", "1"), (last, out.stderr[-3000:], logs)
    assert out.returncode == 0
