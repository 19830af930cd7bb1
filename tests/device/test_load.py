"""The daemon under concurrent clients: 16 clients, 2,000 signatures, zero errors, zero bad signatures."""

from __future__ import annotations

from typing import Any

import pytest

from agent.core.audit import verify
from agent.dev.testing import KINDS, AgentProcess, TokenEnv, check_assertion, cred_id_for, sign_concurrently

CLIENTS = 16
TOTAL = 2000


@pytest.mark.parametrize(
    "server",
    ["", "workers = 2\nsign_threads = 0\n"],
    ids=["one-process-signing-threads", "two-workers-inline"],
)
def test_sixteen_clients_two_thousand_signatures(token_env: TokenEnv, start_agent: Any, server: str) -> None:
    token_env.write_config(server=server)
    agent: AgentProcess = start_agent(token_env)
    pems = {c["name"]: c["publicKey"] for c in agent.http.get("/v1/credentials").json()["credentials"]}
    kinds = [k for k in KINDS if k != "rsa3072"] * 3 + ["rsa3072"]  # mostly the fast, common types
    signed = sign_concurrently(agent.socket_path, {k: cred_id_for(k) for k in KINDS}, kinds, CLIENTS, TOTAL // CLIENTS)
    results, failures, elapsed = signed.results, signed.failures, signed.elapsed
    print(f"\n{len(results)} signatures from {CLIENTS} clients in {elapsed:.2f}s ({len(results) / elapsed:.0f}/s)")

    assert failures == []
    assert len(results) == TOTAL
    for kind, challenge, first_factor in results:
        check_assertion(first_factor, challenge, pems[kind], cred_id_for(kind))
    assert agent.http.get("/v1/health").json()["status"] == "ok"
    audit = verify(token_env.audit_file)  # one chain, even with several processes appending
    assert audit.ok and audit.records == TOTAL
