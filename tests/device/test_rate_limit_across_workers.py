"""A rule's rate limit holds for the whole agent, not per worker (issue 13)."""

from __future__ import annotations

from typing import Any

from agent.dev.testing import NOBODY, AgentProcess, TokenEnv
from tests.device.test_policy_audit import as_nobody

RULE = f"""
[policy]
[[policy.rule]]
name = "nobody-slow"
uids = [{NOBODY}]
credentials = ["p256"]
rate = 0.001
burst = 4
"""


def test_two_workers_admit_one_burst_between_them(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(server="workers = 2\n", extra_top=RULE)
    agent: AgentProcess = start_agent(token_env)
    call = {"method": "POST", "path": "/wallets/wa-1/transfers", "body": {}, "credential": "p256"}
    # A fresh connection per request (the client's), so the kernel spreads them over both workers.
    results = as_nobody(agent, [("POST", "/v1/user-action", call)] * 16)
    statuses = [s for s, _ in results]
    # Admitted ones fail later only because p256 has no Dfns settings (422); with per-worker buckets up to 8
    # would have been admitted.
    assert statuses.count(422) == 4 and statuses.count(429) == 12, results
    assert all("across all workers" in b["error"]["message"] for s, b in results if s == 429)
