"""``python -m bench.http_layer`` (the agent's HTTP server against uvicorn): one short real run.

No speed is asserted; this checks that both servers answered the load without errors and that a verdict
line is printed for each concurrency.
"""

from __future__ import annotations

import subprocess
import sys

from agent.dev.testing import ROOT


def test_both_http_servers_answer_the_load() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.http_layer", "--clients", "4", "--duration", "0.3", "--rounds", "1",
         "--loadgen-procs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith("4 ")]
    assert {r[1] for r in rows} == {"agent", "uvicorn"}, proc.stdout
    assert all(float(r[2].replace(",", "")) > 0 and r[-1] == "0" for r in rows), rows  # rate > 0, no errors
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 1 and "@4 clients" in verdicts[0], proc.stdout
