"""A module that runs out of sessions (``CKR_SESSION_COUNT``: YubiHSM 2 past 16, ykcs11 past 16 per process):
the agent keeps signing on the sessions it has, or on its logged-in session when it has none, with no error
and no open circuit.

The module is SoftHSM behind the benchmark's filter (``bench/slowhsm.c``), which holds each signature 5 ms,
so that signatures overlap, and caps the sessions the agent's process may open."""

from __future__ import annotations

from typing import Any

import pytest

from agent.dev.testing import TokenEnv, check_assertion, sign_concurrently, softhsm_module
from bench import slowhsm

CLIENTS = 16
PER_CLIENT = 10
KINDS = ["p256", "ed25519"]


def _capped(te: TokenEnv, cap: int, token_extra: str = "") -> None:
    """``te``'s agent on the filter: ``cap`` sessions in all for its process, the logged-in one included."""
    try:
        module = slowhsm.build()
    except slowhsm.BuildError as e:
        pytest.fail(str(e))
    env = slowhsm.environ(softhsm_module(), 5.0, max_sessions=cap)
    text = te.config.read_text().replace(f'module = "{softhsm_module()}"', f'module = "{module}"{token_extra}')
    extra = "".join(f'{k} = "{v}"\n' for k, v in env.items())
    te.config.write_text(text.replace("[token.module_env]\n", f"[token.module_env]\n{extra}"))


def _sign_all(te: TokenEnv, start_agent: Any) -> tuple[Any, str]:
    agent = start_agent(te)
    signed = sign_concurrently(agent.socket_path, te.credentials, KINDS, CLIENTS, PER_CLIENT)
    assert signed.failures == [], signed.failures[:5]
    assert len(signed.results) == CLIENTS * PER_CLIENT
    creds = {c["name"]: c for c in agent.http.get("/v1/credentials").json()["credentials"]}
    for kind, challenge, first_factor in signed.results:
        check_assertion(first_factor, challenge, creds[kind]["publicKey"], creds[kind]["credId"])
    health = agent.http.get("/v1/health").json()
    assert health["status"] == "ok" and health["token"]["reconnects"] == 0, health
    return agent, agent.output()


def test_sessions_the_module_refuses_bound_the_pool(token_env: TokenEnv, start_agent: Any) -> None:
    """3 sessions: the logged-in one and 2 for signing; 8 signing threads want more."""
    token_env.write_config(server="workers = 1\nsign_threads = 8\n")
    _capped(token_env, 3)
    _, out = _sign_all(token_env, start_agent)
    assert "CKR_SESSION_COUNT" in out and "signing on at most 2 at once" in out, out


def test_a_process_the_module_gives_no_session_signs_on_its_logged_in_one(
    token_env: TokenEnv, start_agent: Any
) -> None:
    """1 session: the logged-in one; every signature takes its turn on it."""
    token_env.write_config(server="workers = 1\nsign_threads = 8\n")
    _capped(token_env, 1)
    _, out = _sign_all(token_env, start_agent)
    assert "holds none for signing: signing on the logged-in session" in out, out


def test_max_sessions_keeps_within_the_cap(token_env: TokenEnv, start_agent: Any) -> None:
    """With [token] max_sessions = 2 the module never has to refuse one."""
    token_env.write_config(server="workers = 1\nsign_threads = 8\n")
    _capped(token_env, 3, token_extra="\nmax_sessions = 2")
    _, out = _sign_all(token_env, start_agent)
    assert "CKR_SESSION_COUNT" not in out, out
