"""The whole-flow benchmark (``python -m bench.flow``): one short real run.

No speed is asserted: the targets are the benchmark's to print. This checks that both contenders ran real
flows that the local Dfns API accepted (it verifies every signature and user action) and that the API's
injected latency is really paid on each of the three calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent.dev.testing import ROOT


def test_a_short_flow_run_measures_the_agent_and_the_sdk(tmp_path: Path) -> None:
    out = tmp_path / "flow.json"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.flow", "--clients", "1,4", "--duration", "0.6", "--warmup", "0.2",
         "--rounds", "1", "--latency-ms", "5", "--workers", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for who in ("sdk", "agent"):
        cells = {c["clients"]: c for c in result[who]}
        assert set(cells) == {1, 4}, result[who]
        for c in cells.values():
            assert c["flows"] > 0 and c["errors"] == 0, (who, c)
            assert c["p50_ms"] >= 15.0, (who, c)  # three API calls, each held 5 ms
    checks = {c["name"]: c["ok"] for c in result["checks"]}
    assert len(checks) == 4 and all(ok is not None for ok in checks.values()), checks
    assert "PASS  flow: agent zero errors" in proc.stdout
