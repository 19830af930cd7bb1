"""SIGTERM and SIGINT at any moment of start-up end the agent cleanly, and a stopped agent leaves nothing.

Clean means: exit status 0 (a normal stop, what systemd expects of SIGTERM), ``stopped`` logged, the socket
file it bound removed, no worker process left, and no ``dfns-agent-metrics-*`` directory left in its TMPDIR
(each agent here gets a private one, so the check is exact). Every moment is reached by waiting for a
condition (the socket file, the PIN prompt, the first answer), never by sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.dev.testing import (
    PIN,
    ROOT,
    TokenEnv,
    agent_processes,
    cred_id_for,
    make_challenge,
    wait_until,
)

METRICS_DIRS = "dfns-agent-metrics-*"


class Agent:
    """``dfns-agent serve`` with a private TMPDIR; its output in a file."""

    def __init__(self, te: TokenEnv, directory: Path, **popen: Any) -> None:
        self.te = te
        self.socket_path = directory / "run" / "agent.sock"
        self.tmpdir = directory / "tmp"
        self.tmpdir.mkdir()
        self.log_path = directory / "agent.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(te.config), "serve", "--socket", str(self.socket_path)],
                env={**te.env(), "TMPDIR": str(self.tmpdir)},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                **({"stdin": subprocess.DEVNULL} | popen),
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Any, what: str) -> None:
        def holds() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode} before {what}:\n{self.output()}")
            return bool(condition())

        wait_until(holds, 30, what)

    def answers(self) -> bool:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://a") as http:
                return http.get("/v1/health", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics_dirs(self) -> list[Path]:
        return list(self.tmpdir.glob(METRICS_DIRS))

    def stopped_cleanly(self, timeout: float = 30) -> str:
        """Wait for the exit, then check everything a clean stop means; returns the output."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the agent did not stop:\n{self.output()}") from None
        out = self.output()
        assert rc == 0, f"exit status {rc}:\n{out}"
        assert "stopped" in out and "Traceback" not in out, out
        assert not self.socket_path.exists(), "the socket file was left behind"
        assert agent_processes(self.te.config) == set(), "a process of the agent was left behind"
        assert self.metrics_dirs() == [], "the metrics directory was left behind"
        assert PIN not in out
        return out


@pytest.fixture
def agent_dir(short_dir: Path) -> Path:
    return short_dir


def start(te: TokenEnv, directory: Path, workers: int = 1, **popen: Any) -> Agent:
    te.write_config(server=f"workers = {workers}\nsign_threads = 0\n" if workers > 1 else "")
    return Agent(te, directory, **popen)


# -- start-up --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_signal_as_soon_as_the_socket_file_appears(
    token_env: TokenEnv, agent_dir: Path, workers: int, signo: int
) -> None:
    """The socket file is bound before the PIN is read and the token logged in: the agent is starting."""
    agent = start(token_env, agent_dir, workers)
    agent.wait_for(agent.socket_path.exists, "the socket file")
    agent.proc.send_signal(signo)
    agent.stopped_cleanly()


def test_sigterm_while_the_agent_waits_for_the_pin(token_env: TokenEnv, agent_dir: Path) -> None:
    """At the interactive PIN prompt (a terminal on stdin, no PIN file): the wait ends, the agent stops."""
    token_env.write_config(pin="prompt = true")
    primary, secondary = os.openpty()
    try:
        # A new session: no controlling terminal, so the prompt is read from stdin, the pty.
        agent = Agent(token_env, agent_dir, stdin=secondary, start_new_session=True)
        agent.wait_for(lambda: "PIN for token" in agent.output(), "the PIN prompt")
        assert agent.socket_path.exists()
        agent.proc.send_signal(signal.SIGTERM)
        out = agent.stopped_cleanly()
    finally:
        os.close(secondary)
        os.close(primary)
    assert "stopped (SIGTERM while starting)" in out


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_as_soon_as_the_first_answer_comes(token_env: TokenEnv, agent_dir: Path, workers: int) -> None:
    """With workers, the first answer comes from the first worker while the supervisor starts the next."""
    agent = start(token_env, agent_dir, workers)
    agent.wait_for(agent.answers, "the first answer")
    agent.proc.send_signal(signal.SIGTERM)
    agent.stopped_cleanly()


def test_sigterm_while_the_first_worker_logs_in(token_env: TokenEnv, agent_dir: Path) -> None:
    """The first worker has printed where it listens (it has logged in and is about to report ready)."""
    agent = start(token_env, agent_dir, 2)
    agent.wait_for(lambda: "listening on" in agent.output(), "the first worker's announcement")
    agent.proc.send_signal(signal.SIGTERM)
    out = agent.stopped_cleanly()
    assert "workers keep dying" not in out and "restarting it" not in out


def test_sighup_while_starting_is_held_and_then_reloads(token_env: TokenEnv, agent_dir: Path) -> None:
    """SIGHUP's default action ends a process: before the agent serves it is held, then applied."""
    agent = start(token_env, agent_dir)
    agent.wait_for(agent.socket_path.exists, "the socket file")
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for(lambda: "reloaded" in agent.output(), "the held SIGHUP's reload")
    assert agent.answers()
    agent.proc.send_signal(signal.SIGTERM)
    agent.stopped_cleanly()


# -- stopping, and what is left -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stopped_agent_leaves_no_metrics_directory(token_env: TokenEnv, agent_dir: Path, workers: int) -> None:
    agent = start(token_env, agent_dir, workers)
    agent.wait_for(agent.answers, "the agent to serve")
    if workers > 1:
        agent.wait_for(lambda: f"{workers} workers serving" in agent.output(), "every worker")
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://a") as http:
        r = http.post("/v1/sign", json={"challenge": make_challenge(cred_id_for("p256"))})
        assert r.status_code == 200
        assert http.get("/v1/metrics").status_code == 200
    [metrics_dir] = agent.metrics_dirs()  # while it runs, its one directory, with files in it
    assert any(metrics_dir.iterdir())
    agent.proc.send_signal(signal.SIGTERM)
    agent.stopped_cleanly()


@pytest.mark.parametrize("workers", [1, 2])
def test_signals_while_stopping_do_not_cut_the_clean_up_short(
    token_env: TokenEnv, agent_dir: Path, workers: int
) -> None:
    """SIGTERM after SIGTERM (an impatient operator, a service manager signalling every process) until the
    agent has exited: the stop is still a clean one."""
    agent = start(token_env, agent_dir, workers)
    agent.wait_for(agent.answers, "the agent to serve")
    while agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGTERM)
        try:
            agent.proc.wait(0.005)
        except subprocess.TimeoutExpired:
            pass
    agent.stopped_cleanly()
