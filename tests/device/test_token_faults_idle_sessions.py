"""Signing sessions an HSM expired while they sat idle (YubiHSM 2 after 30 s, network HSMs after their idle
timeout), on a real SoftHSM token.

The expiry is real, not mocked: the pool's idle sessions are closed behind the agent's back with the
module's own ``C_CloseSession``, so SoftHSM answers the next signature on them with
``CKR_SESSION_HANDLE_INVALID``. A device expires every session that sat idle as long, not one: the retry of
a signature that met a stale session must be on a fresh session, not on the next idle one (as stale), which
opened the circuit (503 ``token_unavailable`` and a full re-login) after every idle spell with two or more
sessions in the pool. The probe keeps only the logged-in session warm.
"""

from __future__ import annotations

import pytest

from agent.dev.testing import key_label, verify_signature
from agent.health import TokenState
from agent.token import Token


@pytest.mark.parametrize("idle", [2, 3])
def test_sessions_expired_while_idle_are_retried_on_a_fresh_session(token: Token, idle: int) -> None:
    key = token.find_key(key_label("p256"))
    token.expect_keys([key])
    pool = token._pool
    # A burst of `idle` concurrent signatures left that many sessions in the pool.
    held = [pool.checkout() for _ in range(idle)]
    for session in held:
        pool.checkin(session)
    handles = [s.session.handle for s in held]
    assert len(set(handles)) == idle and len(pool._idle) == idle
    raw = token.library.raw
    assert raw is not None
    for handle in handles:  # the device expires them all: they sat idle past its timeout
        assert raw.close_session(handle) == 0

    verify_signature(key.public_pem, token.sign(key, b"after the idle spell"), b"after the idle spell")
    assert token.state is TokenState.OK and token.reconnects == 0
