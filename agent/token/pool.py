"""Signing sessions: one per signature in progress, reused, at most ``[token] max_sessions``, and never more
than the module gives.

PKCS#11 forbids two operations at once on one session, so concurrent signatures need sessions of their own.
Modules cap them: YubiHSM 2 has 16 device sessions in all, ykcs11 16 per process, network HSMs per
partition or client licence. A module at its cap answers ``C_OpenSession`` with ``CKR_SESSION_COUNT``:
capacity, not a fault, so the circuit stays closed. The pool keeps to the sessions it already holds, and
signatures wait for one of them (asking the module for one more now and then: other programs may let theirs
go); a process that holds none (other processes took the module's sessions) signs on the logged-in anchor
session, one signature at a time, and asks the module again now and then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pkcs11 import ObjectClass
from pkcs11 import exceptions as p11

from agent.token.keys import KeyInfo

log = logging.getLogger(__name__)

ASK_AGAIN_AFTER = 30.0  # seconds: with no session of its own, how often a process asks the module for one


class Session:
    """A session signatures take turns on, and the private-key handles found through it."""

    def __init__(self, session: Any, generation: int, *, anchor: bool = False) -> None:
        self.session = session
        self.generation = generation
        self.anchor = anchor  # the logged-in session: shared, never closed here (closing it logs out)
        self.keys: dict[tuple[str, bytes], Any] = {}

    def key(self, info: KeyInfo) -> Any:
        found = self.keys.get((info.label, info.id))
        if found is None:
            query: dict[str, Any] = {"object_class": ObjectClass.PRIVATE_KEY, "label": info.label}
            if info.id:
                query["id"] = info.id
            found = self.keys[(info.label, info.id)] = self.session.get_key(**query)
        return found


class SessionPool:
    """Sessions for signing. ``open_session`` opens one more on the current token; ``anchor`` is the current
    logged-in session, used under ``anchor_lock`` when the module gives this process no session of its own.

    :meth:`checkout` raises what ``open_session`` raises other than ``CKR_SESSION_COUNT``: the caller decides
    whether that is a fault."""

    def __init__(
        self,
        limit: int,
        open_session: Callable[[], Any],
        anchor: Callable[[], Any],
        anchor_lock: threading.RLock,
        name: Callable[[], str],
    ) -> None:
        self._open = open_session
        self._anchor = anchor
        self._anchor_lock = anchor_lock
        self._name = name
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # waited on only while a bound holds
        self._configured = limit or None  # [token] max_sessions (None: no bound)
        # The bound in force: lowered to what the module gave when it refused one more (0: it gave none, sign
        # on the anchor); _grow_at is when to ask it for one more again, _learned the bound it last set.
        self._limit = self._configured
        self._grow_at: float | None = None
        self._learned: int | None = None
        self._in_use = 0  # sessions of our own checked out (not the anchor)
        self._open_sessions: list[Session] = []  # every session of our own that is open
        self._idle: list[Session] = []  # those not signing right now
        self._generation = 0
        self._anchor_session: Session | None = None

    @property
    def limit(self) -> int | None:
        """The bound in force: ``max_sessions``, or fewer when the module gave fewer (None: no bound)."""
        return self._limit

    def checkout(self) -> Session:
        """An idle session of the current generation, a new one, or (when the module gives this process none)
        the anchor; waits while the bound's sessions are all signing."""
        while True:
            with self._lock:
                own = self._take_slot()
                if own:
                    while self._idle:
                        session = self._idle.pop()
                        if session.generation == self._generation:
                            return session
                    generation = self._generation
            if not own:
                return self._checkout_anchor()
            try:
                handle = self._open()
            except p11.SessionCount:
                if self._refused(generation):
                    continue  # wait for one of our own sessions, or take the anchor
                raise
            except BaseException:
                self._release()
                raise
            with self._lock:
                session = Session(handle, generation)
                self._open_sessions.append(session)
                if self._learned == 0:
                    self._learned = None
                    log.info("%s gives this process a session of its own again", self._name())
            return session

    def _take_slot(self) -> bool:
        """With the lock held: wait while the bound's sessions are all signing. True once this signature may
        use a session of our own (counted in use), False when it signs on the anchor (the module gave none)."""
        while self._limit is not None and self._in_use >= self._limit:
            if self._grow_at is not None and time.monotonic() >= self._grow_at:
                self._grow()  # other programs may have let sessions go: ask for one more
                break
            if self._limit == 0:
                return False
            self._cond.wait()
        self._in_use += 1
        return True

    def _refused(self, generation: int) -> bool:
        """The module has no session for us: keep to those we hold, or to the anchor when we hold none. False
        when the generation changed meanwhile (a reconnect: the caller's error is then the token's)."""
        with self._lock:
            self._in_use -= 1
            self._cond.notify()
            if generation != self._generation:
                return False
            held = len(self._open_sessions)
            if self._learned is None or held < self._learned:  # asking again and refused: nothing new to say
                if held:
                    log.warning(
                        "%s refused another session (CKR_SESSION_COUNT) with %d open for signing: signing on at "
                        "most %d at once (set [token] max_sessions to choose the bound)",
                        self._name(),
                        held,
                        held,
                    )
                else:
                    log.warning(
                        "%s refused a session (CKR_SESSION_COUNT) and this process holds none for signing: "
                        "signing on the logged-in session, one signature at a time (other programs or workers "
                        "hold the module's sessions)",
                        self._name(),
                    )
            self._limit = self._learned = held
            self._grow_at = time.monotonic() + ASK_AGAIN_AFTER
            return True

    def _grow(self) -> None:
        """With the lock held, raise a bound the module set: from none (the anchor) back to ``max_sessions``,
        else by one, up to ``max_sessions``. A refusal lowers it again, quietly; the next asking waits
        ``ASK_AGAIN_AFTER`` again."""
        assert self._limit is not None
        if self._limit == 0:
            self._limit, self._grow_at = self._configured, None  # _learned stays 0 until a session opens
            return
        self._limit += 1
        if self._configured is not None and self._limit >= self._configured:
            self._limit, self._grow_at, self._learned = self._configured, None, None
        else:
            self._grow_at = time.monotonic() + ASK_AGAIN_AFTER

    def _checkout_anchor(self) -> Session:
        self._anchor_lock.acquire()
        with self._lock:
            if self._anchor_session is None or self._anchor_session.generation != self._generation:
                self._anchor_session = Session(self._anchor(), self._generation, anchor=True)
            return self._anchor_session

    def checkin(self, session: Session) -> None:
        """A signature is done with ``session``: it may sign again."""
        if session.anchor:
            self._anchor_lock.release()
            return
        with self._lock:
            if session.generation == self._generation and session in self._open_sessions:
                self._idle.append(session)
            self._in_use -= 1
            if self._limit is not None:  # only a bound makes anyone wait
                self._cond.notify()

    def drop(self, session: Session) -> None:
        """``session`` failed: close it (the anchor stays open: recovery deals with it)."""
        if session.anchor:
            with self._lock:
                if self._anchor_session is session:
                    self._anchor_session = None  # its key handles may be stale
            self._anchor_lock.release()
            return
        with self._lock:
            ours = session in self._open_sessions  # else of an old generation: reset() handed it to be closed
            if ours:
                self._open_sessions.remove(session)
        if ours:  # never an old handle: a reloaded module may have given its number to a new session
            try:
                session.session.close()
            except p11.PKCS11Error:
                pass
        self._release()

    def drop_idle(self) -> None:
        """Close the idle sessions: a device that expired one session idle for a while (YubiHSM 2 after 30 s, a
        network HSM's idle timeout) expired those idle as long too, so a retry must open a fresh one."""
        with self._lock:
            idle, self._idle = [s for s in self._idle if s in self._open_sessions], []
            for session in idle:
                self._open_sessions.remove(session)
        for session in idle:
            try:
                session.session.close()
            except p11.PKCS11Error:
                pass  # expired already

    def _release(self) -> None:
        with self._lock:
            self._in_use -= 1
            if self._limit is not None:
                self._cond.notify()

    def reset(self) -> list[Session]:
        """A new generation (reconnect, close): the sessions of the old one, for the caller to close."""
        with self._lock:
            sessions, self._open_sessions, self._idle = self._open_sessions, [], []
            self._generation += 1
            self._anchor_session = None
            if self._limit == 0:  # a reconnect: ask the module for sessions of our own again at once
                self._limit, self._grow_at, self._learned = self._configured, None, None
            return sessions
