"""The signing service: one async API for every signature the agent makes.

``await service.sign(...)`` and ``await service.register(...)`` are what the routes and the Dfns flow call.
Each owns the whole attempt: the blocking token work runs on the signing threads (or right on the event
loop when there are none: a fast local token costs less than the hop to a thread), then the attempt is
written to the audit log and counted, and only then does its result (or error) leave. The audit invariant
lives here: no signature is returned before a durable record of who asked, with which credential, for
which clientData digest; if the record cannot be written, the signature is withheld (fail closed).
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any, TypeVar

from agent.caller import Caller
from agent.config import AuditConfig, CredentialConfig
from agent.core.audit import AuditLog
from agent.core.credentials import Credential, Credentials
from agent.core.keystore import KeyStore
from agent.core.metrics import NO_CREDENTIAL, Metrics
from agent.core.policy import UNRESTRICTED, Grant
from agent.core.records import Action, AuditRecord, Event, Outcome
from agent.core.refusals import RefusalAggregator
from agent.core.signing_threads import SigningThreads
from agent.dfns import (
    ClientData,
    CredentialInfo,
    KeyAssertion,
    Registration,
    RegistrationChallenge,
    UserActionChallenge,
    b64url,
    sha256_hex,
)
from agent.errors import AgentError, CircuitOpen, TokenTimeout
from agent.health import AgentHealth, TokenHealth, TokenState
from agent.token.keys import KeyInfo

T = TypeVar("T")

# How long GET /v1/health waits for the token's own answer before it answers from the state it has.
HEALTH_WAIT = 1.0


@cache
def _health_thread() -> ThreadPoolExecutor:
    """One thread per process for health checks: a check stuck in a hung token is never joined by another,
    and never waits behind signatures stuck in the signing pool."""
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # the main thread takes those, as for every helper
    return ThreadPoolExecutor(
        1, thread_name_prefix="health", initializer=signal.pthread_sigmask, initargs=(signal.SIG_BLOCK, stop)
    )


class _KeySigner:
    """A :class:`agent.dfns.Signer` backed by one key of a :class:`KeyStore`."""

    def __init__(self, keys: KeyStore, key: KeyInfo) -> None:
        self._keys, self._key = keys, key

    def sign(self, message: bytes) -> bytes:
        return self._keys.sign(self._key, message)

    @property
    def public_key_pem(self) -> str:
        return self._key.public_pem


class _Attempt:
    """What one signing attempt learned besides its audit record: whether it got as far as choosing a
    credential (a named one, or the auto-pick), which makes it worth a record and a count even if refused."""

    __slots__ = ("selecting",)

    def __init__(self) -> None:
        self.selecting = False


class _Expired(Exception):
    """Set on a signature's future by its sign_timeout timer (a private type: nothing the module raises
    can be taken for it)."""


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_Expired())


def _outcome(attempt: _Attempt, error: AgentError | None) -> Outcome | None:
    """How an attempt ended, or None when it is not worth a record or a count: a bad request that never
    reached credential selection, or a fail-fast answer while the token recovers (logged once, not per
    request). Every attempt that reached credential selection counts, refused ones too (an unknown name,
    a credential the challenge or the grant does not allow, none of the agent's allowed)."""
    if error is None:
        return Outcome.OK
    if isinstance(error, CircuitOpen) or (not attempt.selecting and error.status < 500):
        return None
    return Outcome.REFUSED if error.status < 500 else Outcome.ERROR


class SigningService:
    """Credentials bound to keys on a :class:`KeyStore`, signing with an audit record for every attempt."""

    def __init__(
        self,
        keys: KeyStore,
        credentials: Credentials,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
        threads: SigningThreads | None = None,
        *,
        started: float | None = None,
        sign_timeout: float = 0.0,
        refusal_interval: float = AuditConfig.refusal_interval,
    ) -> None:
        self.keys = keys
        # Seconds a signature may take on the signing threads before the caller gets 504 token_timeout and the
        # circuit opens (0: no bound). Inline signing (no threads) cannot be bounded: the watchdog covers it.
        self.sign_timeout = sign_timeout
        self._health_check: asyncio.Future[AgentHealth] | None = None
        self._health_check_started = 0.0
        self._last_health: AgentHealth | None = None
        self.audit = audit
        # With the audit log off, refusals still go through an aggregator, only to say which are worth a log
        # line: otherwise a caller hammering refused requests writes one warning each to the journal.
        self._unaudited_refusals = RefusalAggregator(refusal_interval, now=lambda: "") if audit is None else None
        self.metrics = metrics
        self._credentials = credentials
        self._threads = threads
        # When the agent started (wall clock), for health's uptime: the agent's start, not this service's,
        # so a SIGHUP reload (a new service) or a restarted worker does not reset it. Default: now.
        self.started = time.time() if started is None else started

    @classmethod
    def from_config(
        cls,
        keys: KeyStore,
        configs: Sequence[CredentialConfig],
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
        threads: SigningThreads | None = None,
        *,
        started: float | None = None,
        sign_timeout: float = 0.0,
        refusal_interval: float = AuditConfig.refusal_interval,
    ) -> SigningService:
        """Find each credential's key on the token; a missing or ambiguous key is a start-up error."""
        creds = Credentials.from_config(keys, configs)
        return cls(
            keys,
            creds,
            audit,
            metrics,
            threads,
            started=started,
            sign_timeout=sign_timeout,
            refusal_interval=refusal_interval,
        )

    @property
    def credentials(self) -> Credentials:
        return self._credentials

    # -- the two kinds of signature ------------------------------------------------------------------

    async def sign(
        self,
        challenge: object,
        credential: str | None = None,
        *,
        caller: Caller | None = None,
        grant: Grant = UNRESTRICTED,
        action: Action | None = None,
    ) -> KeyAssertion:
        """Sign an ``/auth/action/init`` challenge; the result is ``firstFactor`` for ``POST /auth/action``."""
        record = AuditRecord(Event.SIGN, caller, agent_pid=os.getpid(), action=action)
        attempt = _Attempt()

        def work() -> KeyAssertion:
            parsed = UserActionChallenge.parse(challenge)
            record.challenge = parsed.challenge
            if parsed.challenge_identifier is not None:
                record.challenge_identifier_sha256 = sha256_hex(parsed.challenge_identifier.encode())
            record.credential = credential
            attempt.selecting = True
            cred = self._credentials.for_challenge(parsed, credential, grant)
            self._note(record, cred, cred.cred_id)
            data = ClientData.for_user_action(parsed, cred.origin)
            record.client_data_sha256 = data.sha256_hex
            assertion = KeyAssertion.sign(data, cred.cred_id, _KeySigner(self.keys, cred.key))
            # Not secret, and it makes every record checkable later: rebuild clientData from the
            # challenge, compare its hash, verify this signature with the key of that fingerprint.
            record.signature = b64url(assertion.signature)
            return assertion

        return await self._attempt(record, attempt, work)

    async def register(
        self,
        challenge: object,
        credential: str,
        *,
        cred_id: str | None = None,
        credential_name: str | None = None,
        caller: Caller | None = None,
        grant: Grant = UNRESTRICTED,
    ) -> Registration:
        """Sign an ``/auth/credentials/init`` challenge with the credential's key: the body for
        ``POST /auth/credentials`` (which needs a user action from an existing credential)."""
        record = AuditRecord(Event.REGISTER, caller, agent_pid=os.getpid())
        attempt = _Attempt()

        def work() -> Registration:
            parsed = RegistrationChallenge.parse(challenge)
            record.challenge = parsed.challenge
            record.credential = credential
            attempt.selecting = True
            cred = self._credentials.resolve(credential, grant)
            new_id = cred_id or cred.cred_id
            self._note(record, cred, new_id)
            data = ClientData.for_registration(parsed, cred.origin)
            record.client_data_sha256 = data.sha256_hex
            info = CredentialInfo.sign(data, new_id, _KeySigner(self.keys, cred.key))
            return Registration(info, credential_name or cred.name, parsed.challenge_identifier)

        return await self._attempt(record, attempt, work)

    @staticmethod
    def _note(record: AuditRecord, cred: Credential, cred_id: str) -> None:
        record.credential, record.cred_id, record.key_fingerprint = cred.name, cred_id, cred.key.fingerprint

    async def _attempt(self, record: AuditRecord, attempt: _Attempt, work: Callable[[], T]) -> T:
        """Run ``work`` (which fills in ``record`` as it learns things), then audit and count the attempt;
        the result leaves only after its record is durable."""
        started = time.perf_counter()
        error: AgentError | None = None
        result: T | None = None
        try:
            result = await self._in_pool(work, bounded=True)
        except TokenTimeout as e:
            # The work goes on in its thread and may still fill in the record: audit a copy as it is now.
            error, record = e, copy.copy(record)
            record.signature = None
        except AgentError as e:
            error = e
        outcome = _outcome(attempt, error)
        if outcome is not None and self.audit is not None:
            record.outcome, record.latency_ms = outcome, round((time.perf_counter() - started) * 1000, 3)
            if error is not None:
                record.code, record.reason = error.code, error.message
            try:
                await self.audit.record_async(record)
            except AgentError:
                if error is None:
                    self._count(record, Outcome.ERROR, started)
                    raise  # fail closed: no durable record, no signature
        if outcome is not None:
            self._count(record, outcome, started)
        if error is not None:
            raise error
        assert result is not None
        return result

    async def _in_pool(self, fn: Callable[[], T], *, bounded: bool = False) -> T:
        if self._threads is None:
            return fn()
        future = self._threads.run(fn)
        if not bounded or not self.sign_timeout:
            return await future
        # A timer instead of asyncio.wait_for, which costs a task and a second future per signature.
        expire = asyncio.get_running_loop().call_later(self.sign_timeout, _expire, future)
        try:
            return await future
        except _Expired:
            reason = f"a signature did not come back within {self.sign_timeout:g}s"
            self.keys.fault(reason)
            raise TokenTimeout(f"{self.keys.name}: {reason}; the request is abandoned") from None
        finally:
            expire.cancel()

    def _count(self, record: AuditRecord, outcome: Outcome, started: float) -> None:
        """Count the attempt under its credential, if it is a configured one; else under the fixed label
        :data:`agent.core.metrics.NO_CREDENTIAL` (no name given, or a name that is not configured): a name
        a caller sends never becomes a series of its own."""
        if self.metrics is None:
            return
        name = key_type = NO_CREDENTIAL
        if record.credential is not None and record.credential in self._credentials:
            name, key_type = record.credential, self._credentials.get(record.credential).key.type_name
        seconds = time.perf_counter() - started if outcome is Outcome.OK else None
        self.metrics.sign_outcome(name, key_type, outcome, seconds)

    # -- refusals and health -------------------------------------------------------------------------

    async def audit_refusal(
        self,
        caller: Caller | None,
        endpoint: str,
        error: AgentError,
        *,
        credential: str | None = None,
        action: Action | None = None,
    ) -> bool:
        """Record a request the policy refused (best effort: the refusal stands either way). Aggregated per
        caller and reason (one record, then one summary with a count per interval: a flood cannot fill the
        disk), and awaited, so a caller hammering refused requests does not stall the event loop on fsyncs.
        True when the refusal opened a new interval, i.e. is worth a log line (also with the audit log off)."""
        record = AuditRecord(
            Event.REFUSED,
            caller,
            endpoint=endpoint,
            credential=credential,
            action=action,
            outcome=Outcome.REFUSED,
            code=error.code,
            reason=error.message,
        )
        if self._unaudited_refusals is not None:
            first = self._unaudited_refusals.admit(record)
            self._unaudited_refusals.due()  # ends stale intervals; their summaries have no log to go to
            return first
        assert self.audit is not None  # the aggregator above exists exactly when there is no audit log
        try:
            return await self.audit.refusal(record)
        except AgentError:
            return True

    async def health(self) -> AgentHealth:
        """Token state, anchor session logged in, every credential's key still the same key, audit writable.

        Bounded: the check runs on its own thread, at most one at a time; when the token does not answer
        within :data:`HEALTH_WAIT`, or an earlier check is still stuck, the answer comes from the state the
        agent has (and the circuit opens)."""
        loop = asyncio.get_running_loop()
        check = self._health_check
        if check is None or check.done():
            check = self._health_check = asyncio.ensure_future(loop.run_in_executor(_health_thread(), self._health))
            self._health_check_started = time.monotonic()
        waited = time.monotonic() - self._health_check_started
        try:
            self._last_health = await asyncio.wait_for(asyncio.shield(check), max(HEALTH_WAIT - waited, 0.0))
            return self._last_health
        except asyncio.TimeoutError:
            stuck = time.monotonic() - self._health_check_started
            reason = f"the token has not answered a health check for {stuck:.1f}s"
            self.keys.fault(reason)
            return self._unanswered(reason)

    def _unanswered(self, reason: str) -> AgentHealth:
        """Health from what the agent already knows, without a call to the token."""
        reconnects = self._last_health.token.reconnects if self._last_health is not None else 0
        token = TokenHealth(TokenState.DEGRADED, False, False, reconnects, reason)
        status = TokenState.DEGRADED
        reasons = [reason]
        if self.audit is not None and not self.audit.healthy:
            reasons.append(self.audit.last_error or "audit log unavailable")
            status = TokenState.DOWN
        return AgentHealth(
            status=status,
            identity=self.keys.identity,
            token=token,
            keys={cred.name: False for cred in self._credentials},
            uptime_seconds=round(time.time() - self.started, 3),
            reason="; ".join(reasons),
        )

    def _health(self) -> AgentHealth:
        token = self.keys.health()
        keys: dict[str, bool] = {}
        for cred in self._credentials:
            keys[cred.name] = token.state is TokenState.OK and self._same_key(cred)
        reasons = [token.reason] if token.reason else []
        reasons += [f"key for credential {n!r} not found or changed" for n, good in keys.items() if not good]
        status = token.state
        if status is TokenState.OK and not all(keys.values()):
            status = TokenState.DEGRADED
        # Asked of the file, not of this worker's last write: every worker sharing the log says the same.
        audit_problem = self.audit.probe() if self.audit is not None else None
        if audit_problem is not None:
            reasons.append(audit_problem)
            status = TokenState.DOWN
        return AgentHealth(
            status=status,
            identity=self.keys.identity,
            token=token,
            keys=keys,
            uptime_seconds=round(time.time() - self.started, 3),
            reason="; ".join(dict.fromkeys(reasons)) or None,
        )

    def _same_key(self, cred: Credential) -> bool:
        try:
            return self.keys.find_key(cred.key.label, cred.key.id or None).fingerprint == cred.key.fingerprint
        except AgentError:
            return False
