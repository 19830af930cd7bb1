"""Bounded time on the token, in process: a signature that does not come back within ``sign_timeout`` gets
504 ``token_timeout`` and opens the circuit; health answers within ``HEALTH_WAIT`` from the state the agent
has while the token hangs. The hang is the soft key store's (``hold_signatures``): no real module hangs on
request; the contract suite drills the real one (SIGSTOP of ``p11-kit server``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import CredentialConfig
from agent.core.audit import AuditLog, verify
from agent.core.service import SigningService
from agent.core.signing_threads import SigningThreads
from agent.dev.softkeys import SoftKeyStore
from agent.dev.testing import make_challenge
from agent.errors import CircuitOpen, TokenTimeout
from agent.health import TokenState
from agent.token.keys import KeyKind


def _service(tmp_path: Path, pool: SigningThreads) -> tuple[SoftKeyStore, SigningService, AuditLog]:
    keys = SoftKeyStore.with_keys([("key-p256", KeyKind.P256)])
    audit = AuditLog(tmp_path / "audit.jsonl")
    creds = [CredentialConfig(name="p256", key="key-p256", cred_id="Y3JlZA")]
    return keys, SigningService.from_config(keys, creds, audit, threads=pool, sign_timeout=0.3), audit


def test_a_hung_signature_times_out_opens_the_circuit_and_health_still_answers(tmp_path: Path) -> None:
    with SigningThreads(2) as pool:
        keys, service, audit = _service(tmp_path, pool)
        release = keys.hold_signatures()
        try:

            async def drill() -> None:
                with pytest.raises(TokenTimeout) as timed_out:
                    await service.sign(make_challenge("Y3JlZA"), "p256")
                assert timed_out.value.status == 504 and timed_out.value.code == "token_timeout"
                health = await service.health()  # the soft store's health hangs too: answered from state
                assert health.status is TokenState.DEGRADED and health.keys == {"p256": False}
                assert "has not answered a health check" in (health.reason or "")
                with pytest.raises(CircuitOpen):  # the circuit is open: fail fast
                    await service.sign(make_challenge("Y3JlZA"), "p256")

            asyncio.run(drill())
        finally:
            release.set()
        audit.close()
    records = verify(tmp_path / "audit.jsonl")
    assert records.ok and records.records == 1  # the timed-out attempt, audited (fail-fast ones are not)
    line = (tmp_path / "audit.jsonl").read_text().splitlines()[0]
    assert '"code":"token_timeout"' in line.replace(" ", "") and '"signature":null' not in line.replace(" ", "")
