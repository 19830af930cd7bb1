"""Modules with less than SoftHSM gives: a session cap (``CKR_SESSION_COUNT``: YubiHSM 2 past 16, ykcs11 past
16 per process), and no OS locking (``CKR_CANT_LOCK``). The agent keeps signing, with no error and no open
circuit: on the sessions it has, or on its logged-in session when it has none; one call at a time into a
module that cannot lock.

The module is SoftHSM behind the benchmark's filter (``bench/slowhsm.c``), which holds each signature a few
ms, so that signatures overlap, and caps sessions or refuses OS locking as such modules do."""

from __future__ import annotations

from typing import Any

import pytest

from agent.dev.testing import TokenEnv, check_assertion, run_cli, sign_concurrently, softhsm_module
from bench import slowhsm

CLIENTS = 16
PER_CLIENT = 10
KINDS = ["p256", "ed25519"]


def _capped(te: TokenEnv, cap: int = 0, token_extra: str = "", *, cant_lock: bool = False) -> None:
    """``te``'s agent on the filter: ``cap`` sessions in all for its process, the logged-in one included (0: no
    cap); ``cant_lock``: the module refuses OS locking."""
    try:
        module = slowhsm.build()
    except slowhsm.BuildError as e:
        pytest.fail(str(e))
    env = slowhsm.environ(softhsm_module(), 5.0, max_sessions=cap, cant_lock=cant_lock)
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


def test_a_module_that_cannot_lock_is_called_one_at_a_time(token_env: TokenEnv, start_agent: Any) -> None:
    """SoftHSM initialised without locking corrupts its heap with two threads inside; the agent's 8 signing
    threads must take turns (concurrency "auto")."""
    token_env.write_config(server="workers = 1\nsign_threads = 8\n")
    _capped(token_env, cant_lock=True)
    _, out = _sign_all(token_env, start_agent)
    assert "cannot use OS locking (CKR_CANT_LOCK)" in out, out
    r = run_cli(token_env, "doctor")
    assert "cannot use OS locking (CKR_CANT_LOCK): called one at a time" in r.stdout, r.stdout
