"""SessionPool's bookkeeping (``agent/token/pool.py``) with a stand-in for C_OpenSession: a callable that
gives out numbered sessions up to a cap, then raises python-pkcs11's SessionCount, as a module at its cap
does. The real module's side is in tests/device/test_session_cap.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pkcs11 import exceptions as p11

from agent.dev.testing import wait_until
from agent.token import pool as pool_module
from agent.token.pool import SessionPool


class FakeSession:
    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Module:
    """Sessions up to ``cap`` (None: no cap); counts the refusals."""

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.opened: list[FakeSession] = []
        self.refused = 0

    def open(self) -> FakeSession:
        if self.cap is not None and sum(not s.closed for s in self.opened) >= self.cap:
            self.refused += 1
            raise p11.SessionCount()
        s = FakeSession(len(self.opened))
        self.opened.append(s)
        return s


ANCHOR = FakeSession(-1)


def make_pool(module: Module, limit: int = 0) -> SessionPool:
    return SessionPool(limit, module.open, lambda: ANCHOR, threading.RLock(), lambda: "token 't'")


def checkout_within(pool: SessionPool, seconds: float) -> Any:
    """pool.checkout(), failing instead of hanging when it waits (on a daemon thread, so a hang cannot
    keep the test run alive)."""
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.checkout()), daemon=True)
    t.start()
    t.join(seconds)
    assert got, f"checkout still waiting after {seconds}s"
    return got[0]


def test_sessions_are_reused_and_bounded_by_max_sessions() -> None:
    module = Module(None)
    pool = make_pool(module, limit=2)
    a, b = pool.checkout(), pool.checkout()
    assert {a.session.n, b.session.n} == {0, 1}
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and got == []  # both sessions are signing: the third signature waits
    pool.checkin(a)
    waiter.join(5)
    assert got == [a] and len(module.opened) == 2  # the session handed back, not a new one


def test_a_refused_session_lowers_the_bound_to_the_sessions_held(caplog: pytest.LogCaptureFixture) -> None:
    module = Module(2)
    pool = make_pool(module)
    a, b = pool.checkout(), pool.checkout()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout()))
    waiter.start()
    # The stand-in counts the refusal before the pool has taken it in: wait for both.
    wait_until(lambda: module.refused == 1 and pool.limit == 2, 5, "the third session refused, the bound lowered")
    waiter.join(0.2)
    assert waiter.is_alive() and got == []  # waiting for one of the two
    pool.checkin(b)
    waiter.join(5)
    assert got == [b]
    pool.checkin(a)
    pool.checkin(b)
    assert module.refused == 1  # the bound holds: the module is not asked again
    assert "signing on at most 2 at once" in caplog.text


def test_with_no_session_of_its_own_a_process_signs_on_the_anchor_then_asks_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = Module(0)
    pool = make_pool(module)
    s = pool.checkout()
    assert s.anchor and s.session is ANCHOR
    pool.checkin(s)
    assert pool.checkout() is s and module.refused == 1  # within ASK_AGAIN_AFTER: straight to the anchor
    pool.drop(s)  # a failed signature on the anchor: its handles are dropped, the session is not closed
    assert not ANCHOR.closed
    assert "holds none for signing" in caplog.text
    monkeypatch.setattr(pool_module, "ASK_AGAIN_AFTER", 0.0)
    pool._grow_at = 0.0  # the wait is over
    module.cap = 1
    own = pool.checkout()
    assert not own.anchor and own.session is module.opened[0]


def test_reset_hands_back_the_old_generation_and_forgets_its_sessions() -> None:
    module = Module(None)
    pool = make_pool(module)
    a = pool.checkout()
    pool.checkin(a)
    old = pool.reset()
    assert old == [a]
    b = pool.checkout()
    assert b is not a and b.session is module.opened[1]
    pool.checkin(a)  # a signature of the old generation ending late: not reused
    pool.checkin(b)
    assert pool.checkout() is b  # signing on b, when a reconnect resets the pool:
    assert pool.reset() == [b]  # the caller closes b...
    pool.drop(b)  # ...so the signature on it failing late does not close that handle again
    assert not b.session.closed


def test_other_errors_are_the_callers_and_free_the_slot() -> None:
    def broken() -> Any:
        raise p11.DeviceError()

    pool = SessionPool(1, broken, lambda: ANCHOR, threading.RLock(), lambda: "t")
    for _ in range(2):  # the slot of the failed open was given back: the second call is not stuck waiting
        with pytest.raises(p11.DeviceError):
            pool.checkout()


def test_a_bound_the_module_set_grows_back_when_it_has_sessions_again(caplog: pytest.LogCaptureFixture) -> None:
    module = Module(1)
    pool = make_pool(module)
    a = pool.checkout()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout()))
    waiter.start()
    wait_until(lambda: module.refused == 1 and pool.limit == 1, 5, "the second session refused, the bound set")
    pool.checkin(a)
    waiter.join(5)
    assert got == [a]
    # Another program let its sessions go; the pause before asking again is over (ASK_AGAIN_AFTER).
    module.cap = 3
    pool._grow_at = 0.0
    b = checkout_within(pool, 5)
    assert b is not a and pool.limit == 2 and len(module.opened) == 2
    # Asking again when the module still has none lowers the bound back, without a new warning.
    module.cap = 2
    pool._grow_at = 0.0
    caplog.clear()
    waiter = threading.Thread(target=lambda: got.append(pool.checkout()))
    waiter.start()
    wait_until(lambda: module.refused == 2 and pool.limit == 2, 5, "the third session refused, the bound lowered")
    assert "refused another session" not in caplog.text
    pool.checkin(b)
    waiter.join(5)
    assert got[-1] is b


def test_growing_back_stops_at_max_sessions() -> None:
    module = Module(1)
    pool = make_pool(module, limit=2)
    a = pool.checkout()
    waiter = threading.Thread(target=pool.checkout, daemon=True)
    waiter.start()
    # Not only refused: taken in by the pool, which would otherwise set _grow_at after the test does.
    wait_until(lambda: module.refused == 1 and pool.limit == 1, 5, "the second session refused, the bound set")
    module.cap = None
    pool._grow_at = 0.0
    pool.checkin(a)
    waiter.join(5)
    checkout_within(pool, 5)  # grows to max_sessions, and no further
    assert pool.limit == 2 and pool._grow_at is None
