"""A PIN read from an environment variable is taken out of the environment once read (issue 13): no worker,
no child and (where the kernel lets the agent overwrite it) not even ``/proc/PID/environ`` still shows it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.dev.testing import PIN, AgentProcess, TokenEnv, wait_until

VAR = "DFNS_AGENT_TEST_PIN_FROM_ENV"


def environ_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_pin_from_the_environment_is_gone_from_every_process_once_read(
    token_env: TokenEnv, start_agent: Any, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    token_env.write_config(pin=f'env = "{VAR}"\nprompt = false', server=f"workers = {workers}\n")
    monkeypatch.setenv(VAR, PIN)
    agent: AgentProcess = start_agent(token_env)
    assert agent.http.get("/v1/health").json()["status"] == "ok"  # it did log in with that PIN
    pids = [agent.proc.pid]
    if workers > 1:
        wait_until(lambda: len(children_of(agent.proc.pid)) == workers, 10, "the workers")
        pids += children_of(agent.proc.pid)
    for pid in pids:
        environ = environ_of(pid)
        assert VAR.encode() not in environ and PIN.encode() not in environ, pid
    assert "SOFTHSM2_CONF" in environ_of(agent.proc.pid).decode(errors="replace")  # the rest is untouched
    assert os.environ[VAR] == PIN  # (the test's own environment, which started the agent, still has it)
