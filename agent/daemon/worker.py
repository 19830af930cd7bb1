"""One serving process: log in, find the keys, open the audit log, serve until told to stop.

Each process (the only one, or each pre-forked worker of ``agent/daemon/supervisor.py``) logs in exactly
once. SIGTERM/SIGINT drain in-flight requests (bounded) and log out; SIGHUP reloads credentials, Dfns
settings and policy without touching the token session, and a bad config on reload keeps the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

from agent import __version__
from agent.app.routes import App, Limits
from agent.app.state import AgentState, Generation
from agent.config import Config, DfnsConfig, as_reloaded, load_config
from agent.core.audit import AuditLog
from agent.core.checkpoint import signer_for
from agent.core.metrics import Metrics
from agent.core.policy import Policy
from agent.core.ratelimit import SHARED
from agent.core.service import SigningService
from agent.core.signing_threads import SigningThreads
from agent.daemon.liveness import Heartbeat, beat_interval
from agent.dfnsapi.client import make_transport
from agent.dfnsapi.flow import DfnsFlow
from agent.errors import AgentError, ConfigError, ExitStatus
from agent.paths import audit_path_for
from agent.secret import Secret, read_secret
from agent.token import Token
from agent.transport import systemd
from agent.transport.http import Server
from agent.transport.share import WorkerSlot

log = logging.getLogger(__name__)

# Workers keep these blocked until their event loop handles them (see agent/daemon/supervisor.py); a single
# serving process blocks them just before its loop starts, for the same reason.
LOOP_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """SIGTERM or SIGINT while no serving loop handles them (the agent is starting): raised by the handler
    :func:`stop_on_signal` installs, it unwinds start-up through its ``finally`` clean-ups to
    ``agent.daemon.run.run``, which ends the agent as a normal stop. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way takes it for a failure."""

    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


_stop_requested: int | None = None  # the stop signal that came during start-up, if one did


def _raise_stop(signo: int, frame: object) -> None:
    global _stop_requested
    ignore_stop_signals()  # a second signal must not interrupt the clean-up this one starts
    _stop_requested = signo
    raise StopRequested(signo)


def check_stop() -> None:
    """Raise :class:`StopRequested` again for a stop signal that came during start-up, where the handler's
    exception can be lost: Python prints and drops an exception raised while a finalizer runs (python-pkcs11
    closes sessions and operations in ``__del__``), and the handler has already set the signal aside.
    Called where the serving loop (or the supervisor) is about to take the signals over."""
    if _stop_requested is not None:
        raise StopRequested(_stop_requested)


def stop_on_signal() -> None:
    """From now until a serving loop (or the supervisor) takes them over, SIGTERM and SIGINT stop the agent."""
    for signo in STOP_SIGNALS:
        signal.signal(signo, _raise_stop)


def ignore_stop_signals() -> None:
    """The agent is stopping: SIGTERM, SIGINT and SIGHUP no longer interrupt it (the event loop restores
    the default actions when it closes, which would kill the process half-way through its clean-up)."""
    for signo in (*STOP_SIGNALS, signal.SIGHUP):
        signal.signal(signo, signal.SIG_IGN)


@contextlib.contextmanager
def _held(signals: Collection[int]) -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def held_stop_signals() -> contextlib.AbstractContextManager[None]:
    """Hold SIGTERM/SIGINT for a short step that must not be cut in two (a file made and remembered for
    the clean-up); one that arrived meanwhile is delivered at the end of the step."""
    return _held(STOP_SIGNALS)


def main_thread_signals() -> contextlib.AbstractContextManager[None]:
    """Threads started in this block (the audit writer, the token probe) never take SIGTERM, SIGINT or
    SIGHUP: the kernel delivers a process's signal to any thread that does not block it, and only the main
    thread's mask says when the agent is ready for them (start-up, the event loop, the clean-up)."""
    return _held(LOOP_SIGNALS)


def _block_loop_signals() -> None:
    """A signing thread's initializer: see :func:`main_thread_signals`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)


DfnsSettings = dict[str, tuple[DfnsConfig, Secret]]
ReloadReport = Callable[[bool, str], None]  # (applied, what was loaded or why it was refused)
# What a reload applies, given the running config's path: the file itself (a single serving process), or the
# text the supervisor read and validated (a worker: agent/daemon/supervisor.py).
ConfigReader = Callable[[Path | None], Config]


def read_dfns_tokens(config: Config) -> dict[str, tuple[DfnsConfig, Secret]]:
    """Each credential's Dfns settings with its bearer token, read once at start-up (never logged)."""
    return {
        c.name: (
            c.dfns,
            read_secret(c.dfns.token, what=f"Dfns token for credential {c.name!r}", setting="dfns.token_"),
        )
        for c in config.credentials
        if c.dfns is not None
    }


def open_audit(config: Config, token: Token) -> AuditLog | None:
    if not config.audit.enabled:
        log.warning("the audit log is disabled ([audit] enabled = false); signatures are not recorded")
        return None
    signer = signer_for(config.audit, token, [c.key for c in config.credentials])
    # Records are batched by the event loop whether the token signs on it or on the signing threads (the
    # signature comes back to the loop either way). At 2 ms per signature with 2 workers of 8 threads, two
    # runs each: 2,300-2,700 sig/s and 620-650 us of CPU per request so, 1,700-2,100 sig/s and 720-830 us
    # with a hand-off to the writer thread per record.
    return AuditLog(audit_path_for(config.audit), flush_on_loop=True, settings=config.audit, signer=signer)


def limits_for(config: Config) -> Limits:
    s = config.server
    return Limits(
        max_body=s.max_body_bytes,
        body_timeout=s.body_timeout,
        idle_timeout=s.idle_timeout,
        max_connections=s.max_connections,
        max_connections_per_uid=s.max_connections_per_uid,
    )


def serve_worker(
    config: Config,
    pin: Secret,
    dfns: DfnsSettings,
    sock: socket.socket,
    out: TextIO,
    *,
    announce: bool,
    ready: Callable[[], None] | None = None,
    started: float | None = None,
    on_reload: ReloadReport | None = None,
    share: WorkerSlot | None = None,
    heartbeat: Heartbeat | None = None,
    read_config: ConfigReader = load_config,
) -> None:
    """Log in, find the keys, open the audit log; report ready; serve until SIGTERM/SIGINT. ``started`` is
    when the agent started (the supervisor's start, for a worker): health's uptime counts from it.
    ``on_reload`` hears the outcome of every SIGHUP (applied, or refused with why), which applies the config
    ``read_config`` gives; ``heartbeat`` (a worker's) tells the supervisor this worker still serves
    (``agent/daemon/liveness.py``)."""
    token: Token | None = None
    audit: AuditLog | None = None
    try:
        token = Token.open(config.token, pin)
        with main_thread_signals():
            audit = open_audit(config, token)
        metrics = Metrics()
        token.circuit.on_event = metrics.token_event
        threads = config.server.sign_threads
        with contextlib.ExitStack() as stack:
            signing = stack.enter_context(SigningThreads(threads, initializer=_block_loop_signals)) if threads else None
            service = SigningService.from_config(
                token,
                config.credentials,
                audit,
                metrics,
                signing,
                started=started,
                sign_timeout=config.token.sign_timeout,
                refusal_interval=config.audit.refusal_interval,
            )
            token.expect_keys([c.key for c in service.credentials])
            _self_test(token, service)
            with main_thread_signals():
                token.start_probe()
            if announce:
                _announce(out, sock.getsockname(), token, service, audit, config.server.workers)
            if heartbeat is not None:
                heartbeat.beat()  # judged from now on: a loop that never gets to beat is wedged too
            if ready is not None:
                ready()
            # From here the event loop handles the signals: one that comes before it does is held, then
            # delivered to it (it unblocks them once its handlers are in place).
            signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)
            check_stop()
            _run_loop(
                _serve_until_signalled(
                    config, service, dfns, sock, token, audit, signing, on_reload, share, heartbeat, read_config
                )
            )
    finally:
        ignore_stop_signals()
        try:
            if audit is not None:
                audit.close()  # first: its last checkpoint is signed on the token
        finally:
            if token is not None:
                token.close()


def _self_test(token: Token, service: SigningService) -> None:
    """Before serving (and before a reload takes effect): every credential's key signs a nonce that verifies,
    with a mechanism the module offers; a module that cannot sign fails here, not on the first request."""
    for cred in service.credentials:
        mechanism = token.check_signing(cred.key)
        log.debug("credential %r: key %r signs with %s; self-test passed", cred.name, cred.key.label, mechanism)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed (it roughly halves the HTTP layer's cost per request), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def reload(
    state: AgentState,
    config: Config,
    token: Token,
    audit: AuditLog | None,
    flow: Callable[[SigningService, DfnsSettings], DfnsFlow],
    signing: SigningThreads | None,
    read_config: ConfigReader = load_config,
) -> Config:
    """Apply a re-read config's credentials, Dfns settings and policy; raises (keeping the old) on error."""
    fresh, changed = as_reloaded(config, read_config(config.path))
    if changed:
        sections = ", ".join(f"[{name}]" for name in changed)
        log.warning("%s settings changed in %s; restart the agent to apply them", sections, config.path)
    previous = state.current.service
    service = SigningService.from_config(
        token,
        fresh.credentials,
        audit,
        previous.metrics,
        signing,
        started=previous.started,
        sign_timeout=fresh.token.sign_timeout,
        refusal_interval=fresh.audit.refusal_interval,
    )
    if not len(service.credentials):
        raise ConfigError("no [[credential]] configured")
    dfns = read_dfns_tokens(fresh)
    _self_test(token, service)
    state.replace(Generation(service, flow(service, dfns), Policy(fresh.rules, buckets=SHARED)))
    token.expect_keys([c.key for c in service.credentials])
    log.info("reloaded %s: %d credential(s), %d policy rule(s)", fresh.path, len(service.credentials), len(fresh.rules))
    return fresh


async def _serve_until_signalled(
    config: Config,
    service: SigningService,
    dfns: DfnsSettings,
    sock: socket.socket,
    token: Token,
    audit: AuditLog | None,
    signing: SigningThreads | None,
    on_reload: ReloadReport | None = None,
    share: WorkerSlot | None = None,
    heartbeat: Heartbeat | None = None,
    read_config: ConfigReader = load_config,
) -> None:
    loop = asyncio.get_running_loop()
    current = [config]
    where = systemd.socket_name(sock)  # read it now: the server closes the socket when it stops
    # The pooled Dfns transport belongs to this event loop: made here, closed on the way out.
    async with make_transport() as http:

        def flow(service: SigningService, dfns: DfnsSettings) -> DfnsFlow:
            return DfnsFlow.create(service, http, dfns)

        state = AgentState(Generation(service, flow(service, dfns), Policy(config.rules, buckets=SHARED)))
        app = App(state, limits_for(config))

        def serving() -> str:
            return f"serving {len(state.current.service.credentials)} credential(s) on {where}"

        stop = _StopEvent(lambda: systemd.ready(serving()))

        # Alone, this worker's refusal is the reload's outcome; under a supervisor it is one answer of several,
        # and the supervisor logs the outcome (it may yet replace this worker with one on the checked config).
        alone = heartbeat is None  # a supervisor gives each of its workers a heartbeat
        refused = "reload failed; keeping the previous configuration" if alone else "reload refused by this worker"

        async def on_hup() -> None:
            systemd.reloading()
            try:
                current[0] = await loop.run_in_executor(
                    None, reload, state, current[0], token, audit, flow, signing, read_config
                )
            except AgentError as e:
                log.error("%s: %s", refused, e.message)
                outcome: tuple[bool, str] = (False, e.message)
            except Exception as e:  # noqa: BLE001 - the reload is refused, the agent keeps serving
                log.exception(refused)
                outcome = (False, f"{type(e).__name__}: {e}")
            else:
                outcome = (True, f"{len(state.current.service.credentials)} credential(s)")
            systemd.ready(serving())
            if on_reload is not None:
                on_reload(*outcome)

        def on_stop() -> None:
            systemd.stopping()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(on_hup()))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LOOP_SIGNALS)  # a worker's early signal is delivered now
        interval = systemd.watchdog_interval()
        server = Server(
            app.handle, app.limits, on_protocol_error=app.count_protocol_error, admit=app.admit_connection, share=share
        )

        async def give_up() -> None:
            """A worker stuck in the token: answer what is in flight, accept no more, and exit, so that the
            supervisor starts another (the stuck thread cannot be joined, nor the token closed)."""
            await server.shutdown(config.server.shutdown_timeout)
            sys.stderr.flush()
            os._exit(ExitStatus.SOFTWARE)

        pinger = loop.create_task(_keep_watchdog(interval, token, config.token.stuck_limit)) if interval else None
        if heartbeat is not None and config.token.stuck_limit:
            pinger = pinger or loop.create_task(_keep_beating(heartbeat, token, config.token.stuck_limit, give_up))
        try:
            await server.start(sock)
            await stop.wait()
        finally:
            await server.shutdown(config.server.shutdown_timeout)
            if pinger is not None:
                pinger.cancel()
            # Held from here: closing the loop restores the default actions (death) until the caller's
            # clean-up ignores them (agent/daemon/run.py).
            signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)


class _StopEvent(asyncio.Event):
    """serve()'s stop event. serve() first waits on it once its site accepts connections: that first wait is
    when systemd is told READY=1, so a unit ordered after ours finds the agent answering."""

    def __init__(self, on_serving: Callable[[], object]) -> None:
        super().__init__()
        self._on_serving: Callable[[], object] | None = on_serving

    async def wait(self) -> Literal[True]:
        if self._on_serving is not None:
            hook, self._on_serving = self._on_serving, None
            hook()
        return await super().wait()


async def _keep_watchdog(interval: float, token: Token, stuck_limit: float) -> None:
    """WATCHDOG=1 from the event loop: a wedged loop stops the pings and systemd restarts the agent; so does
    a token call stuck for longer than ``stuck_limit`` (the loop still runs, the token does not)."""
    while True:
        stuck = token.stuck_for()
        if stuck_limit and stuck > stuck_limit:
            log.error("a token call has been stuck for %.0fs; no more watchdog pings", stuck)
        else:
            systemd.watchdog()
        await asyncio.sleep(interval)


async def _keep_beating(
    heartbeat: Heartbeat, token: Token, stuck_limit: float, give_up: Callable[[], Awaitable[None]]
) -> None:
    """A worker's heartbeat from its event loop: the supervisor kills a worker silent for ``stuck_limit``,
    which is what happens when an inline signature stuck in the module blocks the loop. With the loop still
    running, a token call (on a signing thread) stuck for longer than ``stuck_limit`` makes the worker give
    up by itself: it drains its connections and exits."""
    while True:
        stuck = token.stuck_for()
        if stuck > stuck_limit:
            log.error("a token call has been stuck for %.0fs; this worker drains its connections and exits so "
                      "that the supervisor replaces it", stuck)  # fmt: skip
            await give_up()
        heartbeat.beat()
        await asyncio.sleep(beat_interval(stuck_limit))


def _announce(
    out: TextIO, path: str, token: Token, service: SigningService, audit: AuditLog | None, workers: int
) -> None:
    lines = [
        f"dfns-agent {__version__} listening on {path} ({workers} worker process{'es' if workers > 1 else ''})",
        f"{token.name}, {len(service.credentials)} credential(s):",
    ]
    for c in service.credentials:
        lines.append(f"  {c.name}: credId {c.cred_id}, key {c.key.label!r} ({c.key.type_name}), {c.key.fingerprint}")
        lines.append(c.key.public_pem.rstrip("\n"))
    lines.append(f"audit log: {audit.path if audit else 'disabled'}")
    lines.append(f"try: curl --unix-socket {path} http://agent/v1/health")
    out.write("\n".join(lines) + "\n")
    out.flush()
