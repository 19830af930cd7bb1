"""Start-up, reload and shut-down of ``dfns-agent serve``.

Order matters: the process is hardened first, then the socket is claimed (passed by systemd, or bound
here: a second agent on the same path fails before touching the token or asking for a PIN), then the PIN
is read, and each serving process (this one, or pre-forked workers) logs in exactly once, finds the keys
and opens the audit log. Only then does the agent print where it listens, tell systemd READY=1 and start
answering. SIGTERM/SIGINT drain in-flight requests (bounded), log out and remove the socket it bound (one
systemd passed stays); SIGHUP reloads credentials, Dfns settings and policy without touching the token
session, and a bad config on reload keeps the old one.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TextIO

from agent import __version__
from agent.app.routes import AgentState, App, Limits, create_app, serve
from agent.config import Config, DfnsConfig, load_config
from agent.core import metrics
from agent.core.audit import AuditLog
from agent.core.metrics import Metrics
from agent.core.policy import Policy
from agent.core.service import SigningService
from agent.daemon.hardening import harden_process
from agent.errors import AgentError, ConfigError, TokenError
from agent.paths import audit_path_for, socket_path_for
from agent.secret import Secret, read_pin, read_secret
from agent.token.device import Token
from agent.transport import systemd
from agent.transport.listener import bind_unix_socket, remove_socket, socket_inode

log = logging.getLogger(__name__)


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


def open_audit(config: Config) -> AuditLog | None:
    if not config.audit.enabled:
        log.warning("the audit log is disabled ([audit] enabled = false); signatures are not recorded")
        return None
    return AuditLog(audit_path_for(config), flush_on_loop=config.server.sign_threads == 0)


def limits_for(config: Config) -> Limits:
    s = config.server
    return Limits(
        max_body=s.max_body_bytes,
        body_timeout=s.body_timeout,
        idle_timeout=s.idle_timeout,
        max_connections=s.max_connections,
    )


def run(config: Config, *, socket_override: str | Path | None = None, out: TextIO = sys.stdout) -> None:
    """Run the agent until SIGTERM or SIGINT. Raises :class:`agent.errors.AgentError` on start-up failures."""
    harden_process()
    if not config.credentials:
        raise ConfigError(f"{config.path or 'config'}: no [[credential]] configured; nothing to sign with")
    owned: tuple[Path, int] | None = None  # the socket file to remove at exit (systemd's is not ours)
    sock = systemd.listen_socket()
    if sock is None:
        path = socket_path_for(config, socket_override)
        sock = bind_unix_socket(path)
        owned = (path, socket_inode(path))
    metrics_dir: Path | None = None
    try:
        pin = read_pin(config.token)
        dfns = read_dfns_tokens(config)
        metrics_dir = metrics.prepare()  # before any worker imports prometheus_client
        if config.server.workers == 1:
            serve_worker(config, pin, dfns, sock, out, announce=True)
        else:
            Supervisor(config, pin, dfns, sock, out).run()
        log.info("stopped")
    finally:
        if owned is not None:
            remove_socket(*owned)
        sock.close()
        if metrics_dir is not None:
            metrics.cleanup(metrics_dir)


def serve_worker(
    config: Config,
    pin: Secret,
    dfns: dict[str, tuple[DfnsConfig, Secret]],
    sock: socket.socket,
    out: TextIO,
    *,
    announce: bool,
    ready: Callable[[], None] | None = None,
) -> None:
    """One serving process: log in, find the keys, open the audit log, serve until told to stop."""
    token: Token | None = None
    audit: AuditLog | None = None
    try:
        token = Token.open(config.token, pin)
        audit = open_audit(config)
        metrics = Metrics()
        token.on_event = metrics.token_event
        service = SigningService.from_config(token, config.credentials, audit, metrics)
        token.expect_keys([c.key for c in service.credentials])
        token.start_probe()
        if announce:
            _announce(out, sock.getsockname(), token, service, audit, config.server.workers)
        if ready is not None:
            ready()
        threads = config.server.sign_threads
        with ThreadPoolExecutor(max(threads, 1), thread_name_prefix="sign") as pool:
            state = AgentState(service, Policy(config.rules), dfns, pool if threads else None)
            app = create_app(state, limits_for(config))
            _run_loop(_serve_until_signalled(app, sock, config, token, audit))
    finally:
        if token is not None:
            token.close()
        if audit is not None:
            audit.close()


_PR_SET_PDEATHSIG = 1
_LOOP_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
_MAX_RESTARTS = 5  # within _RESTART_WINDOW seconds, then give up and let the service manager restart us
_RESTART_WINDOW = 60.0


class Supervisor:
    """Pre-forked workers sharing the listening socket (SoftHSM and many HSM modules scale with processes,
    not threads). PKCS#11 is loaded in each worker after the fork, never in this process. The first worker
    must log in before any other starts, so a wrong PIN is tried once. Crashed workers are restarted."""

    def __init__(
        self,
        config: Config,
        pin: Secret,
        dfns: dict[str, tuple[DfnsConfig, Secret]],
        sock: socket.socket,
        out: TextIO,
    ) -> None:
        self.config, self.pin, self.dfns, self.sock, self.out = config, pin, dfns, sock, out
        self.workers: dict[int, int] = {}  # pid -> index
        self.restarts: list[float] = []

    def spawn(self, index: int) -> int:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_end)
            systemd.unset_environment()  # only the supervisor (systemd's main pid) notifies
            code = 0
            try:
                # SIGHUP/SIGTERM stay blocked (pending, not lost) until the worker's event loop handles them:
                # the supervisor may pass one on as soon as this worker reports ready.
                signal.pthread_sigmask(signal.SIG_SETMASK, _LOOP_SIGNALS)
                ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

                def ready() -> None:
                    os.write(write_end, b"ok")
                    os.close(write_end)

                serve_worker(self.config, self.pin, self.dfns, self.sock, self.out, announce=index == 0, ready=ready)
            except AgentError as e:
                os.write(write_end, e.message.encode("utf-8", "replace"))
                code = 2 if isinstance(e, ConfigError) else 1
            except BaseException:  # noqa: BLE001 - a worker must never fall back into the supervisor's code
                log.exception("worker %d failed", index)
                code = 70
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read().decode("utf-8", "replace")
        if answer != "ok":
            os.waitpid(pid, 0)
            raise TokenError(answer or f"worker {index} exited during start-up")
        self.workers[pid] = index
        return pid

    def run(self) -> None:
        wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        try:
            for index in range(self.config.server.workers):
                self.spawn(index)
            log.info("%d workers serving", len(self.workers))
            serving = f"{len(self.workers)} workers serving on {systemd.socket_name(self.sock)}"
            systemd.ready(serving)
            interval = systemd.watchdog_interval()
            while True:
                if interval is None:
                    info = signal.sigwaitinfo(wanted)
                else:  # ping on every wake-up, and at least every interval
                    systemd.watchdog()
                    if (timed := signal.sigtimedwait(wanted, interval)) is None:
                        continue
                    info = timed
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    systemd.stopping()
                    break
                if info.si_signo == signal.SIGHUP:
                    systemd.reloading()  # workers reload on their own; READY=1 means they were told
                    self.signal_all(signal.SIGHUP)
                    systemd.ready(serving)
                    continue
                self.reap()
        finally:
            self.stop()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)

    def reap(self) -> None:
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            index = self.workers.pop(pid, None)
            if index is None:
                continue
            metrics.process_dead(pid)
            log.warning("worker %d (pid %d) ended with status %d; restarting it", index, pid, status)
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < _RESTART_WINDOW] + [now]
            if len(self.restarts) > _MAX_RESTARTS:
                raise TokenError(f"workers keep dying ({len(self.restarts)} in {_RESTART_WINDOW:g}s); giving up")
            self.spawn(index)

    def signal_all(self, signo: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGTERM every worker (they drain), wait, and kill what is left after the drain bound."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_timeout + 5.0
        while self.workers and time.monotonic() < deadline:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid:
                self.workers.pop(pid, None)
            else:
                time.sleep(0.05)
        self.signal_all(signal.SIGKILL)
        for pid in list(self.workers):
            os.waitpid(pid, 0)
        self.workers.clear()


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed (it roughly halves the HTTP layer's cost per request), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def reload(state: AgentState, config: Config, token: Token, audit: AuditLog | None) -> Config:
    """Apply a re-read config's credentials, Dfns settings and policy; raises (keeping the old) on error."""
    fresh = load_config(config.path)
    if fresh.token != config.token:
        log.warning("token settings changed in %s; restart the agent to apply them", config.path)
    service = SigningService.from_config(token, fresh.credentials, audit, state.service.metrics)
    if not service.credentials:
        raise ConfigError("no [[credential]] configured")
    dfns = read_dfns_tokens(fresh)
    state.replace(service, Policy(fresh.rules), dfns)
    token.expect_keys([c.key for c in service.credentials])
    log.info("reloaded %s: %d credential(s), %d policy rule(s)", fresh.path, len(service.credentials), len(fresh.rules))
    return fresh


async def _serve_until_signalled(
    app: App, sock: socket.socket, config: Config, token: Token, audit: AuditLog | None
) -> None:
    loop = asyncio.get_running_loop()
    current = [config]

    where = systemd.socket_name(sock)  # read it now: serve() closes the socket when it stops

    def serving() -> str:
        return f"serving {len(app.state.service.credentials)} credential(s) on {where}"

    stop = _StopEvent(lambda: systemd.ready(serving()))

    async def on_hup() -> None:
        systemd.reloading()
        try:
            current[0] = await loop.run_in_executor(None, reload, app.state, current[0], token, audit)
        except AgentError as e:
            log.error("reload failed; keeping the previous configuration: %s", e.message)
        systemd.ready(serving())

    def on_stop() -> None:
        systemd.stopping()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(on_hup()))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _LOOP_SIGNALS)  # a worker's early signal is delivered now
    interval = systemd.watchdog_interval()
    pinger = loop.create_task(_keep_watchdog(interval)) if interval else None
    try:
        await serve(app, sock, stop, shutdown_timeout=config.server.shutdown_timeout)
    finally:
        if pinger is not None:
            pinger.cancel()


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


async def _keep_watchdog(interval: float) -> None:
    """WATCHDOG=1 from the event loop: a wedged loop stops the pings and systemd restarts the agent."""
    while True:
        systemd.watchdog()
        await asyncio.sleep(interval)


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
