"""Several worker processes on one socket: start-up order, crashes, signals."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx

from agent.core.audit import verify
from agent.dev.testing import (
    PIN,
    AgentProcess,
    TokenEnv,
    cred_id_for,
    make_challenge,
    run_cli,
    wait_all_workers,
    wait_until,
)
from agent.dev.testing import child_pids as children

WORKERS = "workers = 3\nsign_threads = 0\n"


def uptimes(agent: AgentProcess, connections: int = 12) -> list[float]:
    """Health's uptime over fresh connections (the kernel spreads them over the workers)."""
    seen = []
    for _ in range(connections):
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://a") as http:
            seen.append(http.get("/v1/health").json()["uptimeSeconds"])
    return seen


def test_workers_share_the_socket_and_one_audit_chain(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(server=WORKERS)
    agent: AgentProcess = start_agent(token_env)
    workers = wait_all_workers(agent, 3)  # health answers once the first serves; the others start after it
    body = {"challenge": make_challenge(cred_id_for("p256"))}
    for _ in range(60):  # a new connection each time, so the kernel spreads them over the workers
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://a") as http:
            assert http.post("/v1/sign", json=body).status_code == 200
    result = verify(token_env.audit_file)
    assert result.ok and result.records == 60
    records = [json.loads(line) for line in token_env.audit_file.read_text().splitlines()]
    served_by = {r["agentPid"] for r in records}
    assert served_by <= workers and len(served_by) >= 2, served_by
    assert "(3 worker processes)" in agent.output()


def test_wrong_pin_is_tried_once_even_with_workers(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(server=WORKERS)
    token_env.pin_file.write_text("wrong-pin-123\n")
    r = run_cli(token_env, "serve", "--socket", str(short_dir / "a.sock"), timeout=60)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("rejected the PIN") == 1, r.stderr
    assert not (short_dir / "a.sock").exists()


def test_a_crashed_worker_is_replaced(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(server=WORKERS)
    agent: AgentProcess = start_agent(token_env)
    before = wait_all_workers(agent, 3)
    wait_until(lambda: min(uptimes(agent)) >= 1.0, 20, "an uptime of a second")
    up = max(uptimes(agent))
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "restarted (pid" in agent.output(), 20, "the restarted worker")
    after = children(agent.proc.pid)
    assert victim not in after and len(after) == 3 and len(after & before) == 2
    assert "restarting it" in agent.output()
    assert min(uptimes(agent)) >= up  # the agent's uptime, the new worker's too
    for _ in range(10):
        assert agent.post("/v1/sign", {"challenge": make_challenge(cred_id_for("ed25519"))}).status_code == 200


def test_sighup_reaches_every_worker_and_sigterm_stops_them_all(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(server=WORKERS)
    agent: AgentProcess = start_agent(token_env)
    workers = wait_all_workers(agent, 3)
    wait_until(lambda: min(uptimes(agent)) >= 1.0, 20, "an uptime of a second")
    up = max(uptimes(agent))
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: agent.output().count("reloaded") == 3, 20, "every worker to reload")
    assert min(uptimes(agent)) >= up  # a reload does not reset the uptime
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(20) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not agent.socket_path.exists()
    assert PIN not in agent.output()
