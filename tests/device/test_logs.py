"""Process logs: JSON lines or journald-friendly text; never a secret."""

from __future__ import annotations

import json
import os
from typing import Any

from agent.dev.testing import PIN, AgentProcess, TokenEnv, cred_id_for, make_challenge


def log_lines(agent: AgentProcess) -> list[str]:
    # stdout carries the start-up announcement (socket path, public keys); the rest is the log
    return [line for line in agent.output().splitlines() if line.startswith(("{", "<"))]


def test_json_logs(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(extra_top='[logging]\nformat = "json"\nlevel = "info"\n')
    agent: AgentProcess = start_agent(token_env)
    agent.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256")), "credential": "nope"})
    agent.stop()
    records = [json.loads(line) for line in log_lines(agent) if line.startswith("{")]
    assert records, agent.output()
    assert all(set(r) >= {"time", "level", "logger", "message", "pid"} for r in records)
    assert any(r["message"] == "stopped" and r["level"] == "info" for r in records)
    assert PIN not in agent.output()


def test_journald_priorities_when_under_systemd(token_env: TokenEnv, start_agent: Any) -> None:
    os.environ["JOURNAL_STREAM"] = "8:12345"  # what systemd sets for a service's stderr
    try:
        agent: AgentProcess = start_agent(token_env)
    finally:
        del os.environ["JOURNAL_STREAM"]
    agent.stop()
    lines = [line for line in log_lines(agent) if line.startswith("<")]
    assert "<6>agent.daemon.run: stopped" in lines, agent.output()
