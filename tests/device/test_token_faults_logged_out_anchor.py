"""A token that logged the agent out under its anchor session (an HSM-side logout, the CKR_USER_NOT_LOGGED_IN
row of ``shared/reference/anchors-agents.md`` §7), on a real SoftHSM token.

The logout is real: a ``C_Logout`` made through the module's own entry point from this process (login state
is per application, as an HSM ending the login is). The anchor session itself stays open. A module then
answers recovery's own ``C_Logout`` on it with ``CKR_USER_NOT_LOGGED_IN`` (or a device error); SoftHSM 2.6
answers ``CKR_OK`` whatever the login state, so that one answer is mocked (:class:`_LogoutRefused`), and all
else is the real module. python-pkcs11's ``Session.close()`` raises on the ``C_Logout`` before it reaches
``C_CloseSession``, so a session the agent no longer used stayed open on the device after every such recovery
(YubiHSM 2 has 16 sessions in all).
"""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
from pkcs11 import exceptions as p11

from agent.dev.testing import key_label, softhsm_module, verify_signature, wait_until
from agent.errors import TokenUnavailable
from agent.token import Token

_CKR_OK = 0


def _log_out(handle: int) -> int:
    """``C_Logout`` on the module instance the agent uses (same dlopen handle): the token ends the login."""
    dll = ctypes.CDLL(softhsm_module())
    dll.C_Logout.argtypes = [ctypes.c_ulong]
    dll.C_Logout.restype = ctypes.c_ulong
    return int(dll.C_Logout(handle))


class _LogoutRefused:
    """The real anchor session, except that its ``close()`` fails as python-pkcs11's does when the module
    answers ``C_Logout`` with ``CKR_USER_NOT_LOGGED_IN``: it raises, and the session stays open (mock)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def close(self) -> None:
        raise p11.UserNotLoggedIn()


def test_recovery_after_an_hsm_side_logout_closes_the_old_anchor_session(token: Token) -> None:
    key = token.find_key(key_label("p256"))
    token.expect_keys([key])
    old = token._anchor.handle
    raw = token.library.raw
    assert raw is not None
    assert _log_out(old) == _CKR_OK
    token._anchor = _LogoutRefused(token._anchor)

    health = token.health()  # sees the anchor no longer logged in, and opens the circuit
    assert not health.logged_in
    wait_until(lambda: token.state == "ok" and token.reconnects == 1, 15, "recovery to log in again")
    verify_signature(key.public_pem, token.sign(key, b"after the logout"), b"after the logout")

    assert token._anchor.handle != old
    # The session recovery replaced must be gone from the device, not left open and unused.
    with pytest.raises(TokenUnavailable, match="CKR_SESSION_HANDLE_INVALID"):
        raw.session_state(old)
