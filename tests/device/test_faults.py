"""Token faults on a real SoftHSM token while 8 clients sign continuously.

The agent must report ``degraded``, answer 503 ``token_unavailable`` meanwhile (never a wrong or silent
answer), recover by itself once the token is back, and every signature it returned (and audited) must
verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.core.audit import verify
from agent.dev.softhsm import reinit_token
from agent.dev.testing import (
    PIN,
    SO_PIN,
    TOKEN_LABEL,
    AgentProcess,
    TokenEnv,
    b64url_decode,
    check_assertion,
    cred_id_for,
    make_challenge,
    verify_signature,
    wait_until,
)
from agent.dfns import KEY_GET, client_data

KINDS_UNDER_LOAD = ["ed25519", "p256"]


class Load:
    """8 clients signing in a loop; every answer is kept for checking."""

    def __init__(self, agent: AgentProcess, clients: int = 8) -> None:
        self.agent = agent
        self.stop = threading.Event()
        self.results: list[tuple[str, dict[str, Any], int, Any]] = []
        self.transport_errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(clients)]

    def _run(self, n: int) -> None:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.agent.socket_path)), base_url="http://a", timeout=30
        ) as http:
            i = 0
            while not self.stop.is_set():
                kind = KINDS_UNDER_LOAD[(n + i) % 2]
                i += 1
                challenge = make_challenge(cred_id_for(kind))
                try:
                    r = http.post("/v1/sign", json={"challenge": challenge, "credential": kind})
                except httpx.HTTPError as e:
                    with self._lock:
                        self.transport_errors.append(repr(e))
                    continue
                with self._lock:
                    self.results.append((kind, challenge, r.status_code, r.json()))
                if r.status_code != 200:
                    time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def count(self, status: int) -> int:
        with self._lock:
            return sum(1 for r in self.results if r[2] == status)


def health_status(agent: AgentProcess) -> str:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://a") as http:
        return str(http.get("/v1/health").json()["status"])


def check_outcome(load: Load, agent: AgentProcess, te: TokenEnv) -> None:
    pems = {c["name"]: c["publicKey"] for c in agent.http.get("/v1/credentials").json()["credentials"]}
    assert load.transport_errors == []
    statuses = {status for _, _, status, _ in load.results}
    assert statuses <= {200, 503}, statuses
    for kind, challenge, status, body in load.results:
        if status == 200:
            check_assertion(body, challenge, pems[kind], cred_id_for(kind))
        else:
            assert body["error"]["code"] == "token_unavailable", body
    # Every signature in the audit log verifies, and the log's chain is intact.
    assert verify(te.audit_file).ok
    by_fingerprint = {c["fingerprint"]: c["publicKey"] for c in agent.http.get("/v1/credentials").json()["credentials"]}
    audited = [json.loads(line) for line in te.audit_file.read_text().splitlines()]
    signed = [r for r in audited if r["event"] == "sign" and r["outcome"] == "ok"]
    assert len(signed) == load.count(200)
    for r in signed:
        data = client_data(r["challenge"], KEY_GET)
        assert hashlib.sha256(data).hexdigest() == r["clientDataSha256"]
        verify_signature(by_fingerprint[r["keyFingerprint"]], b64url_decode(r["signature"]), data)


@pytest.fixture
def fast_probe(token_env: TokenEnv) -> TokenEnv:
    text = token_env.config.read_text().replace("[token.module_env]", "probe_interval = 0.5\n[token.module_env]")
    token_env.config.write_text(text)
    return token_env


def test_token_reinitialized_under_load_then_restored(fast_probe: TokenEnv, start_agent: Any) -> None:
    te = fast_probe
    agent: AgentProcess = start_agent(te)
    backup = te.dir / "tokens.backup"
    shutil.copytree(te.dir / "tokens", backup)
    with Load(agent) as load:
        wait_until(lambda: load.count(200) > 200, 30, "signatures before the fault")
        # Re-initialize the token in place, as an operator might by mistake: every key is wiped.
        reinit_token(te.dir, label=TOKEN_LABEL, pin=PIN, so_pin=SO_PIN)
        wait_until(lambda: health_status(agent) == "degraded", 30, "health degraded")
        wait_until(lambda: load.count(503) > 0, 30, "503 answers while the keys are gone")
        # The token comes back (restored from backup); the agent must notice and resume by itself.
        shutil.rmtree(te.dir / "tokens")
        shutil.copytree(backup, te.dir / "tokens")
        wait_until(lambda: health_status(agent) == "ok", 60, "health ok again")
        after = load.count(200)
        wait_until(lambda: load.count(200) > after + 200, 30, "signatures after recovery")
    check_outcome(load, agent, te)
    health = agent.http.get("/v1/health").json()
    assert health["token"]["reconnects"] >= 1
    # The recovery thread logs this just after it makes the token healthy again: wait for it.
    wait_until(lambda: "reconnected and verified" in agent.output(), 10, "the reconnect to be logged")


def test_module_unreachable_then_back(fast_probe: TokenEnv, start_agent: Any) -> None:
    te = fast_probe
    agent: AgentProcess = start_agent(te)
    tokens, away = te.dir / "tokens", te.dir / "tokens.away"
    with Load(agent) as load:
        wait_until(lambda: load.count(200) > 200, 30, "signatures before the fault")
        os.rename(tokens, away)  # the module's token store is gone: C_Initialize itself fails now
        wait_until(lambda: health_status(agent) == "degraded", 30, "health degraded")
        wait_until(lambda: load.count(503) > 0, 30, "503 answers while the module is unreachable")
        time.sleep(1.0)  # several failed recovery attempts, with backoff
        os.rename(away, tokens)
        wait_until(lambda: health_status(agent) == "ok", 60, "health ok again")
        after = load.count(200)
        wait_until(lambda: load.count(200) > after + 200, 30, "signatures after recovery")
    check_outcome(load, agent, te)
    assert agent.http.get("/v1/health").json()["token"]["reconnects"] >= 1
    metrics = agent.http.get("/v1/metrics").text
    reconnects = [line for line in metrics.splitlines() if line.startswith("dfns_agent_token_reconnects_total")]
    assert reconnects and float(reconnects[0].split()[-1]) >= 1, metrics


def test_idle_agent_notices_a_lost_token_through_its_probe(fast_probe: TokenEnv, start_agent: Any) -> None:
    """Nobody signs; the background probe alone must notice, report degraded, and recover."""
    te = fast_probe
    agent: AgentProcess = start_agent(te)
    tokens, away = te.dir / "tokens", te.dir / "tokens.away"
    os.rename(tokens, away)
    wait_until(lambda: "probe failed" in agent.output(), 10, "the probe to notice")
    assert health_status(agent) == "degraded"
    os.rename(away, tokens)
    wait_until(lambda: health_status(agent) == "ok", 60, "recovery")
    challenge = make_challenge(cred_id_for("ed25519"))
    assert agent.post("/v1/sign", {"challenge": challenge}).status_code == 200


def test_pin_file_is_not_reread_and_a_changed_pin_is_not_tried_twice(
    fast_probe: TokenEnv, start_agent: Any, tmp_path: Path
) -> None:
    """After the token comes back with another PIN, the re-login fails once and the agent goes down."""
    te = fast_probe
    agent: AgentProcess = start_agent(te)
    reinit_token(te.dir, label=TOKEN_LABEL, pin="other-pin-1", so_pin=SO_PIN)
    wait_until(lambda: health_status(agent) == "down", 30, "health down")
    health = agent.http.get("/v1/health").json()
    assert "rejected the PIN" in health["reason"] and "not retrying" in health["reason"]
    wait_until(lambda: "rejected the PIN" in agent.output(), 10, "the rejection to be logged")  # after health
    time.sleep(1.5)  # several probe periods: nothing may try the PIN again
    assert agent.output().count("rejected the PIN") == 1
    r = agent.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256"))})
    assert r.status_code == 503 and r.json()["error"]["code"] == "token_unavailable"
