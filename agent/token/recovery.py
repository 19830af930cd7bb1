"""The token's circuit breaker and its recovery, apart from the sessions they protect.

Faults (``shared/reference/anchors-agents.md`` §7): any device error opens the circuit (``degraded``:
requests fail fast with 503) and one background thread recovers with backoff, calling the token's
``reconnect`` under the gate's exclusive side, so no signature (nor any other call into the module) is
running while sessions (or the module) are replaced. The token counts each attempt as a token call, so one
that hangs in the module (a login, a reload) shows in its ``stuck_for()`` like a hung signature.
A rejected, locked or expired PIN stops recovery (``down``): it is never retried by itself. A different
token (or key) answering is ``down`` too, but recovery keeps checking: the right one may come back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from enum import Enum

from pkcs11 import exceptions as p11

from agent.errors import IdentityMismatch, PinLocked, PinRejected, TokenError
from agent.health import TokenState
from agent.token.gate import Gate
from agent.token.module import describe

log = logging.getLogger(__name__)

_FIRST_DELAY = 0.2
_MAX_BACKOFF = 10.0


class TokenEvent(str, Enum):
    """What :attr:`Circuit.on_event` hears (metrics count reconnects and follow the state)."""

    FAULT = "fault"
    DOWN = "down"
    RECONNECTED = "reconnected"


class Circuit:
    """ok → degraded (recovering in the background) → ok again, or down until an operator acts."""

    def __init__(self, name: Callable[[], str], gate: Gate, reconnect: Callable[[bool], None]) -> None:
        self._name = name
        self._gate = gate
        self._reconnect = reconnect  # (reload_module) -> None; raises while the token is not back
        self.state = TokenState.OK
        self.reason: str | None = None
        self.reconnects = 0
        self.on_event: Callable[[TokenEvent, TokenState], None] | None = None
        self._recovering = threading.Lock()
        self._stop = threading.Event()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        self._stop.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the circuit was closed meanwhile (the token is shutting down)."""
        return self._stop.wait(seconds)

    def _emit(self, event: TokenEvent) -> None:
        if self.on_event is not None:
            self.on_event(event, self.state)

    def fault(self, reason: str) -> None:
        """Open the circuit and start recovering in the background (once)."""
        if self._stop.is_set() or self.state is TokenState.DOWN:
            return
        if self.state is TokenState.OK:
            log.warning("%s: %s; recovering", self._name(), reason)
        self.state, self.reason = TokenState.DEGRADED, reason
        self._emit(TokenEvent.FAULT)
        if self._recovering.acquire(blocking=False):
            threading.Thread(target=self._recover, name="token-recovery", daemon=True).start()

    def down(self, reason: str) -> None:
        """Stop signing until an operator acts (a locked PIN, say)."""
        self.state, self.reason = TokenState.DOWN, reason
        self._emit(TokenEvent.DOWN)

    def _recover(self) -> None:
        try:
            delay, attempt = _FIRST_DELAY, 0
            while not self._stop.is_set():
                attempt += 1
                try:
                    with self._gate.exclusive():
                        if self._stop.is_set():
                            return  # closed while this waited for the gate: close() has the sessions
                        self._reconnect(attempt > 1)  # later attempts reload the module too
                except (PinRejected, PinLocked) as e:
                    self.down(e.message)
                    log.error("%s: %s; not retrying the PIN", self._name(), e.message)
                    return
                except IdentityMismatch as e:
                    self.down(e.message)
                    log.error("%s: %s", self._name(), e.message)
                except (TokenError, p11.PKCS11Error) as e:
                    if self._stop.is_set():
                        return  # closed meanwhile (the attempt gave up its new session): nothing to report
                    reason = e.message if isinstance(e, TokenError) else describe(e)
                    self.reason = f"reconnecting (attempt {attempt}): {reason}"
                    log.info("%s: %s", self._name(), self.reason)
                else:
                    self.reconnects += 1
                    self.state, self.reason = TokenState.OK, None
                    self._emit(TokenEvent.RECONNECTED)
                    log.warning("%s: reconnected and verified (attempt %d)", self._name(), attempt)
                    return
                self._stop.wait(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
        finally:
            self._recovering.release()
