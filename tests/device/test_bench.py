"""The benchmark (``python -m bench``): one short real run (its verdict logic on known figures is in
``tests/unit/test_bench_report.py``).

No speed is asserted here: the targets are the benchmark's to print. This checks that it measures what it
says: every contender answers, signatures verify, rounds are pooled as documented.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent.dev.testing import ROOT


def test_a_short_real_run_measures_every_contender(tmp_path: Path) -> None:
    """The whole benchmark on a throwaway token, cut short: agent, ssh-agent and the in-process limit all
    answer, in two rounds, with verified signatures and no errors."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--duration", "0.3", "--rounds", "2", "--clients", "1,16",
         "--workers", "1", "--loadgen-procs", "1", "--pool", "1500", "--sample", "5", "--slow-clients", "8",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rounds"] == 2
    for kind, algo in result["algorithms"].items():
        for row in algo["rows"]:
            contenders = [row["agent"]] + ([row["ssh_agent"]] if kind == "p256" else [])
            for c in contenders:
                assert c["rate"] > 0 and c["errors"] == 0 and c["verified"] > 0, (kind, row)
                assert len(c["round_rates"]) == 2 and c["p50_ms"] > 0
        for lim in (algo["limit_1"], algo["limit_n"]):
            assert lim["rate"] > 0 and lim["bad"] == 0 and len(lim["round_rates"]) == 2 and lim["cpu_us_per_sig"] > 0
    slow = result["slow_hsm"]  # the same token behind the filter that holds each signature 2 ms
    for c in (slow["agent"], slow["ssh_agent"]):
        assert c["rate"] > 0 and c["errors"] == 0 and c["verified"] > 0 and len(c["round_rates"]) == 2, slow
        assert c["p50_ms"] >= 2.0, slow  # no answer can beat the module's own 2 ms hold
    assert slow["sessions"] == 8 and "sign_threads=8 (the default)" in slow["settings"]
    checks = {c["name"]: c["ok"] for c in result["checks"]}
    assert checks["agent: zero errors"] is True
    assert len(checks) == 12
    # The 1- and 16-client targets were measured, so each has a verdict (which one is the run's business).
    assert [ok for name, ok in checks.items() if "@64" not in name and ok is None] == []
    assert "ECDSA P-256" in proc.stdout and "Ed25519" in proc.stdout and "CPU budget per request" in proc.stdout
    assert "bytes per signature answered" in proc.stdout
