"""The logged-in token: sessions per signing thread, key generation, signing with retry, probe and health.

- One logged-in *anchor* session lives as long as the process: closing the last session (or calling
  python-pkcs11's ``Session.close()`` on the logged-in one) logs the whole token out.
- Signatures take an unauthenticated session from a pool (``agent/token/pool.py``: PKCS#11 forbids
  concurrent use of one session), at most ``[token] max_sessions`` and never more than the module gives;
  the anchor's login makes private keys usable on all.
  In serial mode (``[token] concurrency``) every call into the module is made one at a time.
- A stale session or handle is retried once on a fresh session; any other device error opens the circuit
  and recovery takes over (``agent/token/recovery.py``). Before signing again it checks that the token has
  the same serial and that every expected key still signs and verifies against the public key known at
  start-up.
- Every call into the module takes the gate's shared side (``agent/token/gate.py``), and recovery and
  :meth:`Token.close` take it alone: the module is never finalized, nor the anchor closed, under a call.
  Calls other than signatures (keys, self-tests, health) are refused while the circuit is open.
- :meth:`Token.stuck_for` counts every token call: signatures, the probe, those calls, and each recovery
  attempt (a login or module reload that hangs is as stuck as a signature). :meth:`Token.close` waits for
  them at most ``CLOSE_TIMEOUT`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from pkcs11 import Attribute, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11

from agent.config import KeygenTemplate, TokenConcurrency, TokenConfig
from agent.errors import (
    AgentError,
    CircuitOpen,
    IdentityMismatch,
    KeyExists,
    KeyUsageRefused,
    PinLocked,
    PinRejected,
    SelfTestFailed,
    TokenError,
    TokenUnavailable,
    UnsupportedKey,
)
from agent.health import TokenHealth, TokenIdentity, TokenState
from agent.secret import Secret
from agent.token import module
from agent.token.gate import Gate
from agent.token.keys import (
    KeyInfo,
    KeyKind,
    choose_mechanism,
    find_key,
    generate_keypair,
    key_info,
    mechanism_name,
    self_test,
    sign_with,
)
from agent.token.module import USER_STATES, LoadedModule, RawModule, describe, load_module, unload_module
from agent.token.pool import Session, SessionPool
from agent.token.recovery import Circuit

log = logging.getLogger(__name__)

# Errors on one session or handle: retried once on a fresh session before the token is suspected.
# Pauses before probing again after a failed probe; None: give up (the fault is real). See _probe_loop.
_PROBE_RETRIES: tuple[float | None, ...] = (0.05, 0.25, None)
_STALE = (p11.SessionHandleInvalid, p11.SessionClosed, p11.ObjectHandleInvalid, p11.KeyHandleInvalid)
# Seconds close() waits for token calls in progress before it leaves the sessions to the process's exit: the
# supervisor kills a worker that has not exited shutdown_timeout + 5 s after SIGTERM.
CLOSE_TIMEOUT = 3.0


class Token:
    """A logged-in token. Thread-safe: each calling thread signs on its own session."""

    def __init__(self, cfg: TokenConfig, pin: Secret, loaded: LoadedModule, token: Any, anchor: Any) -> None:
        self.module = cfg.module
        self._cfg = cfg
        self._pin = pin  # kept only to log in again after the device dropped the session
        self._loaded = loaded
        self._token = token
        self._anchor = anchor
        self._anchor_loaded = loaded  # the module instance the anchor was opened on
        self._anchor_lock = threading.RLock()
        self.serial = _serial(cfg, loaded)
        self._pool = SessionPool(
            cfg.max_sessions, lambda: self._token.open(), lambda: self._anchor, self._anchor_lock, lambda: self.name
        )
        self._gate = Gate()
        self.identity = _identity(token)
        self._expected: list[KeyInfo] = []
        self._mechanisms: dict[KeyKind, Mechanism] = {}
        self._inflight: dict[int, float] = {}  # thread id -> when its token call began (any, recovery's too)
        self.circuit = Circuit(lambda: self.name, self._gate, self._reconnect)
        self._probe: threading.Thread | None = None

    # The circuit's state, read on every signature and by health.
    @property
    def state(self) -> TokenState:
        return self.circuit.state

    @property
    def reason(self) -> str | None:
        return self.circuit.reason

    @property
    def reconnects(self) -> int:
        return self.circuit.reconnects

    # -- opening and closing -----------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: TokenConfig, pin: Secret, *, rw: bool = False) -> Token:
        """Load the module, find the token and log in once. A rejected PIN is never retried."""
        for name, value in cfg.module_env.items():
            os.environ[name] = value
        loaded = load_module(cfg.module)
        token = module.find_token(loaded.lib, cfg)
        anchor = _login(token, pin, rw=rw)
        return cls(cfg, pin, loaded, token, anchor)

    def start_probe(self, interval: float | None = None) -> None:
        """Check the token every ``interval`` seconds: keeps idle sessions alive, notices faults early."""
        period = interval if interval is not None else self._cfg.probe_interval
        self._probe = threading.Thread(target=self._probe_loop, args=(period,), name="token-probe", daemon=True)
        self._probe.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop background work, close worker sessions, then log out. Errors are ignored on the way out.

        Waits at most ``timeout`` seconds (default ``CLOSE_TIMEOUT``) for the token calls in progress (a
        signature, the probe, a recovery attempt): one still running then is stuck in the module, and the
        sessions are left to the process's exit rather than blocking it; the log says so."""
        if self.circuit.closed:
            return
        self.circuit.close()
        deadline = time.monotonic() + (CLOSE_TIMEOUT if timeout is None else timeout)
        if self._probe is not None:
            self._probe.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._gate.acquire_exclusive(max(0.0, deadline - time.monotonic())):
            try:
                self._close_sessions()
            finally:
                self._gate.release_exclusive()
        else:
            log.error(
                "%s: gave up waiting for a token call in progress for %.1fs (it has run %.1fs); not logging out: "
                "the process's exit ends the session",
                self.name,
                CLOSE_TIMEOUT if timeout is None else timeout,
                self.stuck_for(),
            )
        self._pin = Secret("", "cleared")

    def _close_sessions(self) -> None:
        for session in self._pool.reset():
            try:
                session.session.close()
            except p11.PKCS11Error:
                pass
        with self._anchor_lock:
            # Its handle means nothing to a module loaded since: never close a number another session may have.
            _close_logged_in(self._anchor, self._loaded.raw if self._anchor_loaded is self._loaded else None)

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        return f"token {self.identity.label!r} (serial {self.identity.serial})"

    # -- keys ----------------------------------------------------------------------------------------

    def expect_keys(self, keys: list[KeyInfo]) -> None:
        """The keys that must still be there, unchanged, before signing resumes after a reconnect."""
        self._expected = list(keys)

    def keys(self) -> list[KeyInfo]:
        with self._on_anchor(), self._errors("list keys"):
            privs = list(self._anchor.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            return [key_info(self._anchor, p) for p in privs]

    def find_key(self, label: str, key_id: bytes | None = None) -> KeyInfo:
        with self._on_anchor(), self._errors(f"find key {label!r}"):
            return find_key(self._anchor, label, key_id, self.name)

    def generate(self, kind: KeyKind, label: str) -> KeyInfo:
        """Generate a key pair on the device: private half SENSITIVE, non-EXTRACTABLE, PRIVATE, SIGN only (or,
        with ``keygen_template = "module"``, with the usages the module adds where ``allow_other_usages`` takes
        them). A key the agent would not serve is destroyed, never left on the token for a later start-up to
        refuse, and so is a second key with the label made by another process at the same moment."""
        if not label:
            raise UnsupportedKey("a key needs a non-empty label")
        with self._on_anchor(), self._errors("generate a key"):
            s = self._anchor
            if next(iter(s.get_objects({Attribute.LABEL: label})), None) is not None:
                raise KeyExists(f"an object labelled {label!r} already exists on {self.name}")
            sign_only = self._cfg.keygen_template is KeygenTemplate.SIGN_ONLY
            try:
                priv = generate_keypair(s, kind, label, sign_only=sign_only)
            except (p11.GeneralError, p11.TemplateInconsistent, p11.AttributeValueInvalid) as e:
                if not sign_only:
                    raise
                raise TokenUnavailable(
                    f"{self.name} refused the sign-only key template ({describe(e)}); if this module cannot make "
                    'sign-only keys (tpm2-pkcs11 cannot), set [token] keygen_template = "module" and '
                    "allow_other_usages = true: its keys then also allow what the module adds (e.g. CKA_DECRYPT)"
                ) from None
            info = key_info(s, priv)

            def discard(error: AgentError) -> NoReturn:
                for obj in list(s.get_objects({Attribute.ID: info.id, Attribute.LABEL: label})):
                    obj.destroy()
                raise error

            if info.extractable or not info.sensitive:
                # A module that ignored the template must not leave an exportable key behind.
                discard(TokenError(f"{self.name} did not honour SENSITIVE/non-EXTRACTABLE; key destroyed"))
            refused = self._usage_refused(info)
            if refused is not None:  # a key the agent would refuse to serve is not left behind either
                hint = (
                    "; set [token] allow_other_usages = true to accept such keys"
                    if info.signs and not sign_only
                    else ""
                )
                discard(
                    KeyUsageRefused(
                        f"{self.name} made a key that {refused}, which the agent refuses; key destroyed{hint}"
                    )
                )
            # Another process may have made a key with this label meanwhile (the check above is not atomic with
            # the generation): the one with the lowest CKA_ID stays, the others are destroyed by their makers.
            same = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
            if min(bytes(k[Attribute.ID]) for k in same) != info.id:
                discard(
                    KeyExists(f"another key labelled {label!r} was made on {self.name} at the same time; key destroyed")
                )
            return info

    def mechanism_for(self, kind: KeyKind) -> Mechanism:
        """The mechanism this token signs ``kind`` keys with, chosen once from what the module reports;
        raises :class:`UnsupportedMechanism` naming the ones it lacks."""
        found = self._mechanisms.get(kind)
        if found is None:
            with self._on_anchor():
                found = self._mechanism(kind)
        return found

    def _mechanism(self, kind: KeyKind) -> Mechanism:
        """:meth:`mechanism_for`, called on the anchor (:meth:`_on_anchor`)."""
        found = self._mechanisms.get(kind)
        if found is None:
            with self._errors("list the mechanisms"):
                found = self._mechanisms[kind] = choose_mechanism(kind, self._token.slot, self.name)
        return found

    def _usage_refused(self, key: KeyInfo) -> str | None:
        """Why the agent will not serve ``key`` for what it allows, or None: the one rule for the self-test
        and for a key just generated."""
        if not key.signs:
            return "does not allow signing (CKA_SIGN is false)"
        if key.other_usages and not self._cfg.allow_other_usages:
            return f"also allows {', '.join(key.other_usages)}"
        return None

    def check_signing(self, key: KeyInfo) -> str:
        """The start-up and doctor self-test: a mechanism exists for the key's kind, and the key signs a fresh
        nonce that verifies with its public key. Returns the mechanism's name."""
        if key.kind is None:
            raise UnsupportedKey(f"key {key.label!r} is {key.type_name}; cannot sign with it")
        refused = self._usage_refused(key)
        if refused is not None:
            more = "; refusing a key that can do more than sign (set [token] allow_other_usages = true to accept it)"
            raise KeyUsageRefused(f"key {key.label!r} on {self.name} {refused}{more if key.signs else ''}")
        with self._on_anchor():  # never under recovery: it may be closing the anchor or reloading the module
            mechanism = self._mechanism(key.kind)
            try:
                self_test(self._anchor, key, key, mechanism)
            except IdentityMismatch:
                raise SelfTestFailed(
                    f"key {key.label!r} on {self.name} signed with {mechanism_name(mechanism)}, but the signature "
                    "does not verify with its public key"
                ) from None
            except p11.PKCS11Error as e:
                raise SelfTestFailed(
                    f"key {key.label!r} on {self.name} cannot sign with {mechanism_name(mechanism)}: {describe(e)}"
                ) from None
        return mechanism_name(mechanism)

    # -- signing -------------------------------------------------------------------------------------

    def sign(self, key: KeyInfo, message: bytes) -> bytes:
        """Sign ``message`` on the device with ``key``, in the encoding Dfns expects for its type."""
        if key.kind is None:
            raise UnsupportedKey(f"key {key.label!r} is {key.type_name}; cannot sign with it")
        if self.circuit.state is not TokenState.OK:
            raise CircuitOpen(f"{self.name} is unavailable: {self.circuit.reason}")
        mechanism = self.mechanism_for(key.kind)
        with self._in_call():
            return self._sign(key, message, mechanism)

    def _sign(self, key: KeyInfo, message: bytes, mechanism: Mechanism) -> bytes:
        assert key.kind is not None
        with self._gate.shared(), self._one_at_a_time():
            if self.circuit.state is not TokenState.OK:  # it opened while this waited for recovery's attempt
                raise CircuitOpen(f"{self.name} is unavailable: {self.circuit.reason}")
            for attempt in (1, 2):
                session = self._checkout()
                try:
                    signature = sign_with(session.key(key), key.kind, message, mechanism)
                except _STALE as e:
                    self._pool.drop(session)
                    if attempt == 1:
                        # An idle session the device expired (and with it the others idle as long), or a stale
                        # handle: once more, on a fresh session.
                        self._pool.drop_idle()
                        continue
                    error: BaseException = e
                except p11.PKCS11Error as e:
                    self._pool.drop(session)
                    error = e
                except BaseException:
                    self._pool.drop(session)
                    raise
                else:
                    self._pool.checkin(session)
                    return signature
                break
        self.circuit.fault(f"signing with {key.label!r} failed: {describe(error)}")
        raise TokenUnavailable(f"{self.name} could not sign with {key.label!r}: {describe(error)}")

    def _one_at_a_time(self) -> Any:
        """Serial mode: every call into the module under one lock (the anchor's, which probe and health
        take too); else nothing."""
        return self._anchor_lock if self.serial else contextlib.nullcontext()

    def fault(self, reason: str) -> None:
        """Open the circuit from outside (a signature that did not come back in time)."""
        self.circuit.fault(reason)

    @contextmanager
    def _in_call(self) -> Iterator[None]:
        """This thread is in a token call until the block ends: what :meth:`stuck_for` measures."""
        me = threading.get_ident()
        self._inflight[me] = time.monotonic()
        try:
            yield
        finally:
            self._inflight.pop(me, None)

    def stuck_for(self) -> float:
        """How long the oldest token call still running has been running (0 when none is): signatures, the
        probe, keys, self-tests and health, and recovery's attempts (sessions, login, module reload)."""
        started = list(self._inflight.values())
        return time.monotonic() - min(started) if started else 0.0

    @contextmanager
    def _on_anchor(self) -> Iterator[None]:
        """A call on the anchor session other than a signature (keys, self-test, health): a token call under the
        gate's shared side and the anchor lock, so that recovery never closes the anchor nor reloads the
        module under it. Refused (:class:`CircuitOpen`) while the circuit is open, recovery is waiting for the
        gate, or the token is closed: the anchor may be closed and the module unloaded then."""
        if not self._gate.try_shared():
            raise CircuitOpen(f"{self.name} is unavailable: {self.circuit.reason or 'being recovered or closed'}")
        try:
            if self.circuit.closed:
                raise CircuitOpen(f"{self.name} is closed")
            if self.circuit.state is not TokenState.OK:
                raise CircuitOpen(f"{self.name} is unavailable: {self.circuit.reason}")
            with self._in_call(), self._anchor_lock:
                yield
        finally:
            self._gate.release_shared()

    def _checkout(self) -> Session:
        """A session to sign on (``agent/token/pool.py``); one the module will not open is a fault."""
        if self.circuit.closed:
            raise TokenUnavailable(f"{self.name} is closed")
        try:
            return self._pool.checkout()
        except p11.PKCS11Error as e:
            self.circuit.fault(f"cannot open a session: {describe(e)}")
            raise TokenUnavailable(f"cannot open a session on {self.name}: {describe(e)}") from None

    # -- recovery, probe and health ------------------------------------------------------------------

    def _reconnect(self, reload_module: bool) -> None:
        """Sessions again (and the module again, on later attempts); then prove it is the same token.
        Called by the circuit's recovery with the gate held exclusively: a token call like any other, so one
        that hangs (a login, a reload) shows in :meth:`stuck_for`."""
        with self._in_call():
            self._reconnect_now(reload_module)

    def _reconnect_now(self, reload_module: bool) -> None:
        self._close_sessions()
        if reload_module:
            unload_module(self.module)
            self._loaded = load_module(self.module)
        token = module.find_token(self._loaded.lib, self._cfg)
        # Serial alone proves little (opencryptoki's is always 123): label, serial, manufacturer and model must
        # all match, and below every expected key must have the same public key and pass the self-test.
        now = _identity(token)
        if now != self.identity:
            raise IdentityMismatch(
                f"the token now answering is {_describe(now)}, not {_describe(self.identity)}; refusing to use it"
            )
        anchor = _login(token, self._pin, rw=False)
        self._mechanisms.clear()  # a reloaded module may offer other mechanisms
        try:
            for expected in self._expected:
                found = find_key(anchor, expected.label, expected.id or None, self.name)
                if found.fingerprint != expected.fingerprint:
                    raise IdentityMismatch(
                        f"key {expected.label!r} on {self.name} is not the key the agent started with"
                    )
                assert found.kind is not None
                self_test(anchor, found, expected, choose_mechanism(found.kind, token.slot, self.name))
            if self.circuit.closed:  # close() gave up waiting for this attempt: log out again, keep nothing
                raise TokenUnavailable(f"{self.name} was closed while it reconnected")
        except BaseException:
            _close_logged_in(anchor, self._loaded.raw)
            raise
        with self._anchor_lock:
            self._token, self._anchor, self._anchor_loaded = token, anchor, self._loaded

    def _probe_once(self) -> tuple[bool, int]:
        with self._in_call(), self._gate.shared(), self._anchor_lock:  # a probe that hangs is stuck too
            if self.circuit.state is not TokenState.OK or self.circuit.closed:
                raise CircuitOpen(f"{self.name} is unavailable: {self.circuit.reason}")
            logged_in = self._logged_in()
            flags = self._token.slot.get_token().flags
            for expected in self._expected[:1]:  # a call that reaches the device, not just the library
                find_key(self._anchor, expected.label, expected.id or None, self.name)
        return logged_in, int(flags)

    def _probe_loop(self, period: float) -> None:
        while not self.circuit.wait(period):
            if self.circuit.state is not TokenState.OK:
                continue
            # A fault must be seen twice: SoftHSM rewrites token.object on every C_Login, and another process
            # on the same token (a worker logging in) reading it meanwhile gets NoSuchToken/GeneralError.
            result: tuple[bool, int] | None = None
            error = ""
            for retry in _PROBE_RETRIES:
                try:
                    result = self._probe_once()
                    break
                except CircuitOpen:
                    break  # it opened while this probe waited for the gate: recovery has the token
                except (TokenError, p11.PKCS11Error) as e:
                    error = e.message if isinstance(e, TokenError) else describe(e)
                    if retry is None or self.circuit.wait(retry):
                        break
                    log.info("%s: probe failed (%s); probing again in %gs", self.name, error, retry)
            if self.circuit.closed:
                return
            if result is None:
                if self.circuit.state is TokenState.OK:
                    self.circuit.fault(f"probe failed: {error}")
                continue
            logged_in, flags = result
            if flags & TokenFlag.USER_PIN_LOCKED:
                self.circuit.down(f"{self.name} reports its user PIN is locked")
            elif not logged_in:
                self.circuit.fault("the token session is no longer logged in")

    def health(self) -> TokenHealth:
        """State (ok / degraded / down), reason, and whether the anchor session is there and logged in."""
        present = logged_in = False
        if self.circuit.state is TokenState.OK:
            try:
                with self._on_anchor():
                    logged_in = self._logged_in()
                present = True
            except CircuitOpen:
                pass  # it opened meanwhile: recovery has the token
            except TokenError as e:
                self.circuit.fault(f"health check failed: {e.message}")
            if present and not logged_in:
                self.circuit.fault("the token session is no longer logged in")
        c = self.circuit
        return TokenHealth(c.state, present, logged_in, c.reconnects, c.reason)

    def _logged_in(self) -> bool:
        """Whether the anchor session is still logged in: ``C_GetSessionInfo`` where we reach the module's
        instance; else (p11-kit) whether the token still shows a private object to it, which it does only
        to a logged-in session. Call with the anchor lock held."""
        state = self._loaded.session_state(self._anchor.handle)
        if state is not None:
            return state in USER_STATES
        try:
            private = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.PRIVATE: True}
            return next(iter(self._anchor.get_objects(private)), None) is not None
        except p11.UserNotLoggedIn:
            return False
        except p11.PKCS11Error as e:
            raise TokenUnavailable(f"cannot check the login on {self.name}: {describe(e)}") from None

    @property
    def library(self) -> LoadedModule:
        return self._loaded

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except p11.PKCS11Error as e:
            raise TokenUnavailable(f"cannot {what} on {self.name}: {describe(e)}") from None


# Modules that fail when two threads call into them at once, by C_GetInfo manufacturerID: tpm2-pkcs11 1.9
# ("Esys called in bad sequence": one ESYS context per token).
SERIAL_MODULES = frozenset({"tpm2-software.github.io"})
P11KIT = "PKCS#11 Kit"


def _identity(token: Any) -> TokenIdentity:
    return TokenIdentity(
        label=token.label,
        serial=token.serial.decode("ascii", "replace"),
        manufacturer=token.manufacturer_id,
        model=token.model,
    )


def _describe(identity: TokenIdentity) -> str:
    return (
        f"label {identity.label!r}, serial {identity.serial}, {identity.manufacturer.strip()} {identity.model.strip()}"
    )


def _serial(cfg: TokenConfig, loaded: LoadedModule) -> bool:
    """Whether calls into the module must be one at a time: as configured, else (``auto``) for the modules
    known to need it, for one that cannot lock (``CKR_CANT_LOCK``), and for a per-call-instance module other
    than p11-kit (we could not give it locking)."""
    if cfg.concurrency is not TokenConcurrency.AUTO:
        return cfg.concurrency is TokenConcurrency.SERIAL
    maker = loaded.manufacturer.strip()
    return maker in SERIAL_MODULES or loaded.cant_lock or (not loaded.os_locking and maker != P11KIT)


def _close_logged_in(session: Any, raw: RawModule | None) -> None:
    """Log out and close the logged-in ``session``, ignoring errors. python-pkcs11's ``close()`` raises on a
    failed ``C_Logout`` (``CKR_USER_NOT_LOGGED_IN`` once the token ended the login, a device error) and never
    calls ``C_CloseSession`` then: the session is closed here instead, so no recovery leaves one open on the
    device. ``raw``: the module instance ``session`` belongs to (None: none we can reach, or not that one)."""
    try:
        session.close()
    except (p11.SessionHandleInvalid, p11.SessionClosed):
        pass  # gone already
    except p11.PKCS11Error:
        if raw is not None:
            raw.close_session(session.handle)  # its answer changes nothing: the session is no longer ours


def _login(token: Any, pin: Secret, *, rw: bool) -> Any:
    """Open the anchor session and log in. Checks the PIN flags first; never retries."""
    flags = token.flags
    name = f"token {token.label!r}"
    if flags & TokenFlag.USER_PIN_LOCKED:
        raise PinLocked(f"{name} reports its user PIN is locked; unlock it with the token's SO tools")
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        raise PinLocked(
            f"{name} reports one PIN attempt left; not trying, because a wrong PIN would lock it. "
            "Log in once with the vendor's tool to confirm the PIN, then start the agent again"
        )
    try:
        return token.open(user_pin=pin.reveal(), rw=rw)
    except p11.PinIncorrect:
        raise PinRejected(
            f"{name} rejected the PIN from {pin.source}; not retrying (retries can lock the token)"
        ) from None
    except (p11.PinLocked, p11.PinExpired) as e:
        raise PinLocked(f"{name} refused login: {describe(e)}") from None
    except (p11.PinInvalid, p11.PinLenRange) as e:
        raise PinRejected(f"{name} refused the PIN from {pin.source}: {describe(e)}") from None
    except p11.UserAlreadyLoggedIn:
        # Login state is per application: another Token in this process already logged in.
        return token.open(rw=rw)
    except p11.PKCS11Error as e:
        raise TokenUnavailable(f"cannot log in to {name}: {describe(e)}") from None
