"""Several worker processes on one socket: start-up order, crashes, signals."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from agent.core.audit import verify
from agent.dev.testing import (
    PIN,
    ROOT,
    AgentProcess,
    Notifications,
    TokenEnv,
    cred_id_for,
    key_label,
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


# ------------------------------------------------------------------------------------------------------
# Reloads with several workers: one outcome for all of them


def served_keys(agent: AgentProcess, connections: int = 30) -> set[tuple[str, ...]]:
    """The credentials health lists, over fresh connections (spread over the workers): one entry per
    configuration the workers serve."""
    seen = set()
    for _ in range(connections):
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://a") as http:
            seen.add(tuple(sorted(http.get("/v1/health").json()["keys"])))
    return seen


def with_only(te: TokenEnv, credential: str) -> str:
    """``te``'s config with a single credential, ``credential`` (whose body follows its name line)."""
    head = te.config.read_text().split("\n[[credential]]", 1)[0]
    return f"{head}\n[[credential]]\nname = {credential}\n"


def start_reload(te: TokenEnv, agent: AgentProcess, timeout: float = 40) -> subprocess.Popen[str]:
    """``dfns-agent reload --pid`` (the units' ExecReload=) in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "reload", "--pid", str(agent.proc.pid), "--timeout", str(timeout)],
        env=te.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def worker_reloads(agent: AgentProcess) -> int:
    return agent.output().count("reloaded /")


def test_every_worker_applies_the_config_the_supervisor_read(token_env: TokenEnv, start_agent: Any) -> None:
    """A worker that gets to the reload late applies what the supervisor validated, not what the file holds
    by then (here: a file broken after the reload was asked for)."""
    token_env.write_config(server=WORKERS)
    agent: AgentProcess = start_agent(token_env)
    late = min(wait_all_workers(agent, 3))
    os.kill(late, signal.SIGSTOP)
    try:
        token_env.config.write_text(with_only(token_env, f'"p256"\nkey = "{key_label("p256")}"'))
        command = start_reload(token_env, agent)
        wait_until(lambda: worker_reloads(agent) == 2, 20, "the two running workers to reload")
        token_env.config.write_text("[token\nthis is not TOML\n")
    finally:
        os.kill(late, signal.SIGCONT)
    out, err = command.communicate(timeout=60)
    assert command.returncode == 0, (out, err, agent.output())
    assert "reloaded: 1 credential(s) in 3 workers" in out, out
    assert worker_reloads(agent) == 3, agent.output()
    assert late in children(agent.proc.pid)  # it applied it: nothing was replaced
    assert served_keys(agent) == {("p256",)}


def test_a_worker_that_refuses_a_validated_reload_is_replaced_on_it(token_env: TokenEnv, start_agent: Any) -> None:
    """The workers split (one refuses what the others applied): the agent adopts the new config, replaces
    the refusing worker with one started on it, and the reload command says so."""
    token_env.write_config(server=WORKERS)
    agent: AgentProcess = start_agent(token_env)
    late = min(wait_all_workers(agent, 3))
    secret = token_env.config.parent / "dfns-token"
    secret.write_text("bearer-token-for-the-test\n")
    secret.chmod(0o600)
    # A relative token_file: read next to the config file, by the supervisor and by every worker.
    fresh = with_only(token_env, f'"p256"\nkey = "{key_label("p256")}"\n[credential.dfns]\ntoken_file = "dfns-token"')
    os.kill(late, signal.SIGSTOP)
    try:
        token_env.config.write_text(fresh)
        command = start_reload(token_env, agent)
        wait_until(lambda: worker_reloads(agent) == 2, 20, "the two running workers to reload")
        secret.unlink()  # the late worker cannot read it: it refuses the reload
    finally:
        os.kill(late, signal.SIGCONT)
    out, err = command.communicate(timeout=60)
    assert command.returncode == 0, (out, err, agent.output())
    assert "reloaded: 1 credential(s) in 3 workers" in out and "replaced" in out, out
    assert "cannot open Dfns token" in out, out  # why it was replaced
    wait_until(lambda: late not in children(agent.proc.pid), 10, "the refusing worker to be gone")
    assert len(children(agent.proc.pid)) == 3
    assert served_keys(agent) == {("p256",)}
    assert "bearer-token-for-the-test" not in agent.output()
    # The refusing worker's own line does not claim the previous configuration stays: it did not.
    assert "reload refused by this worker" in agent.output()
    assert "keeping the previous configuration" not in agent.output()


def test_watchdog_pings_go_on_while_a_reload_waits_for_a_stopped_worker(
    token_env: TokenEnv, start_agent: Any, short_dir: Path
) -> None:
    """WatchdogSec= is 4 s here: a reload waiting for a wedged worker keeps pinging, gives up on it in time
    and replaces it, so that every worker serves the new config."""
    token_env.write_config(server=WORKERS)
    notify = short_dir / "notify"
    listener = Notifications(str(notify))
    try:
        agent: AgentProcess = start_agent(token_env, env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "4000000"})
        wedged = min(wait_all_workers(agent, 3))
        listener.wait_for("READY=1", agent.proc)
        os.kill(wedged, signal.SIGSTOP)
        token_env.config.write_text(with_only(token_env, f'"p256"\nkey = "{key_label("p256")}"'))
        pings = [time.monotonic()]
        command = start_reload(token_env, agent, timeout=30)
        deadline = time.monotonic() + 40
        while command.poll() is None and time.monotonic() < deadline:
            got = listener.receive(0.2)
            if got is not None and "WATCHDOG=1" in got[1]:
                pings.append(time.monotonic())
        pings.append(time.monotonic())
        out, err = command.communicate(timeout=30)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 4.0, gaps  # below the watchdog timeout all along
        assert command.returncode == 0, (out, err, agent.output())
        assert "did not answer" in out and "replaced" in out, out
        wait_until(lambda: wedged not in children(agent.proc.pid), 10, "the wedged worker to be gone")
        assert served_keys(agent) == {("p256",)}
        assert len(children(agent.proc.pid)) == 3
    finally:
        listener.close()
