"""Recovery on a real SoftHSM token when it does not go to plan: a re-login that hangs, and a self-test that
runs while recovery reloads the module.

The hang is real, not mocked: another process holds a POSIX read lock on the token's ``token.object`` (as a
backup or a ``softhsm2-util`` run reading the store would), and SoftHSM's ``C_Login``, which rewrites that
file, waits for the lock. Everything else recovery does before it (closing sessions, listing tokens) only
reads the file, so the recovery thread hangs in the login itself.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import agent.token.device as agent_token
from agent.dev.softhsm import reinit_token
from agent.dev.testing import PIN, SO_PIN, TOKEN_LABEL, TokenEnv, key_label, wait_until
from agent.errors import SelfTestFailed, TokenUnavailable
from agent.health import TokenState
from agent.token import Token
from agent.token import keys as token_keys
from agent.token import module as token_module

STUCK_LIMIT = 0.5  # seconds: a small [token] stuck_limit for the test

_HOLD_LOCK = """
import fcntl, sys
with open(sys.argv[1], "rb") as f:
    fcntl.lockf(f, fcntl.LOCK_SH)
    print("locked", flush=True)
    sys.stdin.read()
"""


def recovering(token: Token) -> bool:
    return token.circuit._recovering.locked()


@contextmanager
def store_read_locked(te: TokenEnv) -> Iterator[None]:
    """Another process holds a read lock on the token's object file: SoftHSM's reads go on, writes wait."""
    (path,) = (te.dir / "tokens").glob("*/token.object")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder exits, and the kernel releases its lock
        holder.wait(10)


def thread_in(name: str, function: str) -> bool:
    """Whether the thread called ``name`` is inside ``function`` right now."""
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1) if thread.name == name else None
        while frame is not None:
            if frame.f_code.co_name == function:
                return True
            frame = frame.f_back
    return False


def test_a_hung_relogin_counts_as_a_stuck_token_call(token: Token, token_env: TokenEnv) -> None:
    with store_read_locked(token_env):
        token.fault("test: the device dropped the session")
        wait_until(lambda: thread_in("token-recovery", "_login"), 10, "recovery to wait in C_Login")
        # What the worker's heartbeat and watchdog read: past the limit, the worker is replaced.
        wait_until(lambda: token.stuck_for() > STUCK_LIMIT, 10, "stuck_for() past the limit during the login")
        assert token.state is TokenState.DEGRADED
        assert thread_in("token-recovery", "_login")
    wait_until(lambda: token.state is TokenState.OK, 15, "recovery once the login goes through")
    assert token.stuck_for() == 0.0


def test_close_gives_up_on_a_hung_recovery_within_its_bound(
    token: Token, token_env: TokenEnv, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bound = 1.0
    monkeypatch.setattr(agent_token, "CLOSE_TIMEOUT", bound, raising=False)
    caplog.set_level(logging.INFO, logger="agent.token")
    with store_read_locked(token_env):
        token.fault("test: the device dropped the session")
        wait_until(lambda: thread_in("token-recovery", "_login"), 10, "recovery to wait in C_Login")
        began = time.monotonic()
        closing = threading.Thread(target=token.close, name="closing")
        closing.start()
        closing.join(bound + 10)
        took = time.monotonic() - began
        returned = not closing.is_alive()
        assert returned, f"close() still blocked after {took:.1f}s (bound {bound}s)"
        assert took < bound + 2.0, took
        assert "gave up waiting" in caplog.text
        assert thread_in("token-recovery", "_login")  # close() did not wait for it
    # Once the login goes through, the closed token must not come back to life (nor stay logged in).
    wait_until(lambda: not recovering(token), 15, "recovery to end after the login went through")
    assert token.state is not TokenState.OK
    assert "reconnected" not in caplog.text


def test_the_module_is_never_unloaded_under_a_self_test(
    token: Token, token_env: TokenEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery's later attempts reload the module (C_Finalize, unload); a self-test (SIGHUP's reload runs
    one) running meanwhile must not be inside the module then. Instrumented: each unload waits a moment for
    a self-test call to be in progress, and notes whether one was."""
    key = token.find_key(key_label("p256"))
    token.expect_keys([key])
    lock = threading.Lock()
    tester: list[int] = []
    inside = [0]  # the self-test thread's calls into the module in progress
    unloading = [False]
    overlaps: list[bool] = []  # per unload: did a self-test call run during it
    outcomes: dict[str, int] = {"ok": 0, "refused": 0, "failed": 0}
    unexpected: list[BaseException] = []

    def traced(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() not in tester:
                return real(*args, **kwargs)  # recovery's own calls, made under the gate
            with lock:
                inside[0] += 1
                if unloading[0]:
                    overlaps[-1] = True
            try:
                return real(*args, **kwargs)
            finally:
                with lock:
                    inside[0] -= 1

        return call

    real_unload = token_module.unload_module  # what agent.token.device calls

    def traced_unload(path: str) -> None:
        with lock:
            unloading[0] = True
            overlaps.append(inside[0] > 0)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline and not overlaps[-1]:
            with lock:
                overlaps[-1] = overlaps[-1] or inside[0] > 0
            time.sleep(0.002)
        try:
            real_unload(path)
        finally:
            with lock:
                unloading[0] = False

    monkeypatch.setattr(agent_token, "self_test", traced(token_keys.self_test))
    monkeypatch.setattr(agent_token, "choose_mechanism", traced(token_keys.choose_mechanism))
    monkeypatch.setattr(agent_token, "unload_module", traced_unload)
    stop = threading.Event()

    def self_tests() -> None:
        tester.append(threading.get_ident())
        while not stop.is_set():
            try:
                token.check_signing(key)
                outcomes["ok"] += 1
            except TokenUnavailable as e:
                assert "unavailable" in e.message or "closed" in e.message, e.message
                outcomes["refused"] += 1
            except SelfTestFailed:
                outcomes["failed"] += 1  # the keys are really gone for a moment, before recovery starts
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                unexpected.append(e)
            time.sleep(0.001)

    thread = threading.Thread(target=self_tests, name="self-tests")
    thread.start()
    backup = token_env.dir / "tokens.backup"
    try:
        wait_until(lambda: outcomes["ok"] > 0, 10, "a self-test passing")
        shutil.copytree(token_env.dir / "tokens", backup)
        reinit_token(token_env.dir, label=TOKEN_LABEL, pin=PIN, so_pin=SO_PIN)  # every key wiped: recovery retries
        token.fault("test: the keys are gone")
        wait_until(lambda: len(overlaps) >= 2, 30, "two module reloads by recovery")
        shutil.rmtree(token_env.dir / "tokens")
        shutil.copytree(backup, token_env.dir / "tokens")
        wait_until(lambda: token.state is TokenState.OK, 60, "recovery once the keys are back")
        passed = outcomes["ok"]
        wait_until(lambda: outcomes["ok"] > passed, 10, "a self-test passing after recovery")
    finally:
        stop.set()
        thread.join(10)
    assert unexpected == []
    assert overlaps and not any(overlaps), f"module unloaded while a self-test was inside it: {overlaps}"
    assert outcomes["refused"] > 0, outcomes
