"""Pre-forked workers sharing the listening socket, and the supervisor that starts, restarts and stops them."""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import TextIO

from agent.config import Config, as_reloaded, load_config
from agent.core import metrics
from agent.daemon import reload_status
from agent.daemon.liveness import Heartbeats, beat_interval
from agent.daemon.worker import (
    LOOP_SIGNALS,
    STOP_SIGNALS,
    DfnsSettings,
    check_stop,
    ignore_stop_signals,
    read_dfns_tokens,
    serve_worker,
)
from agent.errors import AgentError, ConfigError, ExitStatus, PinRejected, TokenError, exit_status_for
from agent.secret import Secret
from agent.transport import systemd
from agent.transport.share import ConnectionShare

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MAX_RESTARTS = 5  # within _RESTART_WINDOW seconds, then give up and let the service manager restart us
_RESTART_WINDOW = 60.0
_STOP_CHECK = 0.05  # how often a supervisor waiting for a worker to start looks for SIGTERM/SIGINT
_RELOAD_WAIT = 60.0  # how long a reload waits for every worker's answer before calling it failed

# A worker's lines to the supervisor on its control pipe (each one write, well under PIPE_BUF: atomic).
_READY = b"ready\n"
_RELOADED = b"reloaded "
_REFUSED = b"refused "
_START_FAILED = b"failed "  # + the exit status class, a space, the message


def _start_error(line: bytes, index: int) -> AgentError:
    """The error a worker's start-up failure is re-raised as in the supervisor: of the same exit class, so a
    rejected PIN or a config error ends the agent with the status systemd's units look for."""
    text = line.decode("utf-8", "replace").rstrip("\n")
    if not text.startswith(_START_FAILED.decode()):
        return TokenError(f"worker {index} exited during start-up")
    status, _, message = text[len(_START_FAILED) :].partition(" ")
    kind = {str(int(ExitStatus.PIN)): PinRejected, str(int(ExitStatus.CONFIG)): ConfigError}.get(status, TokenError)
    return kind(message or f"worker {index} exited during start-up")


def _tell(fd: int, data: bytes) -> None:
    """A worker's start-up answer to the supervisor. It may no longer be listening (it is stopping, and
    stops this worker next; or the worker already answered): then there is no one to tell."""
    try:
        os.write(fd, data)
    except OSError:
        pass


class Supervisor:
    """Pre-forked workers sharing the listening socket (SoftHSM and many HSM modules scale with processes,
    not threads). PKCS#11 is loaded in each worker after the fork, never in this process. The first worker
    must log in before any other starts, so a wrong PIN is tried once. Crashed workers are restarted."""

    def __init__(
        self,
        config: Config,
        pin: Secret,
        dfns: DfnsSettings,
        sock: socket.socket,
        out: TextIO,
        started: float | None = None,
    ) -> None:
        self.config, self.pin, self.dfns, self.sock, self.out = config, pin, dfns, sock, out
        self.started = time.time() if started is None else started  # the agent's start: every worker's uptime
        self.workers: dict[int, int] = {}  # pid -> index
        self.control: dict[int, int] = {}  # pid -> read end of its control pipe (ready, then reload outcomes)
        self.restarts: list[float] = []
        self.reloads = 0
        # Mapped before the first fork: how the workers share the socket's connections (agent/transport/share.py).
        self.share = ConnectionShare(config.server.workers) if config.server.workers > 1 else None
        # And whether each still serves (agent/daemon/liveness.py): judged on every wake-up below.
        self.heartbeats = Heartbeats(config.server.workers)

    def spawn(self, index: int) -> int:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_end)
            for fd in self.control.values():  # the other workers' pipes are the supervisor's
                os.close(fd)
            systemd.unset_environment()  # only the supervisor (systemd's main pid) notifies
            code = 0
            try:
                # SIGHUP/SIGTERM stay blocked (pending, not lost) until the worker's event loop handles them:
                # the supervisor may pass one on as soon as this worker reports ready.
                signal.pthread_sigmask(signal.SIG_SETMASK, LOOP_SIGNALS)
                ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

                def ready() -> None:
                    _tell(write_end, _READY)

                def reloaded(ok: bool, message: str) -> None:
                    _tell(write_end, (_RELOADED if ok else _REFUSED) + message.encode("utf-8", "replace")[:400] + b"\n")

                serve_worker(
                    self.config,
                    self.pin,
                    self.dfns,
                    self.sock,
                    self.out,
                    announce=index == 0,
                    ready=ready,
                    started=self.started,
                    on_reload=reloaded,
                    share=self.share.slot(index) if self.share is not None else None,
                    heartbeat=self.heartbeats.slot(index),
                )
            except AgentError as e:
                code = exit_status_for(e)
                _tell(write_end, _START_FAILED + f"{code} {e.message}".encode("utf-8", "replace")[:3000] + b"\n")
            except BaseException:  # noqa: BLE001 - a worker must never fall back into the supervisor's code
                log.exception("worker %d failed", index)
                code = ExitStatus.SOFTWARE
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        self.workers[pid] = index  # from now on stop() stops it, even while it starts
        self.control[pid] = read_end
        while not select.select([read_end], [], [], _STOP_CHECK)[0]:
            if self.stop_pending():
                return pid  # it starts (its signals held) and is stopped with the rest
        answer = _read_line(read_end)
        if answer != _READY:
            self.workers.pop(pid, None)
            self._forget(pid)
            os.waitpid(pid, 0)
            raise _start_error(answer, index)
        return pid

    def _forget(self, pid: int) -> None:
        fd = self.control.pop(pid, None)
        if fd is not None:
            os.close(fd)

    @staticmethod
    def stop_pending() -> bool:
        """SIGTERM or SIGINT came (held, for the loop in :meth:`run`): no more workers are started."""
        return bool(signal.sigpending() & set(STOP_SIGNALS))

    def run(self) -> None:
        wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        try:
            check_stop()
            for index in range(self.config.server.workers):
                if self.stop_pending():
                    break
                self.spawn(index)
            serving = f"{len(self.workers)} workers serving on {systemd.socket_name(self.sock)}"
            if not self.stop_pending():  # else the loop below stops at once: no READY=1 for a stopping agent
                log.info("%d workers serving", len(self.workers))
                systemd.ready(serving)
            interval = systemd.watchdog_interval()
            limit = self.config.token.stuck_limit
            wake = min(x for x in (interval, beat_interval(limit) if limit else None, 3600.0) if x is not None)
            while True:
                # On every wake-up, and at least every `wake` seconds: replace wedged workers, ping systemd.
                if limit:
                    self.replace_silent(limit)
                if interval is not None:
                    systemd.watchdog()
                if (timed := signal.sigtimedwait(wanted, wake)) is None:
                    continue
                info = timed
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    systemd.stopping()
                    break
                if info.si_signo == signal.SIGHUP:
                    systemd.reloading()
                    self.reload()
                    systemd.ready(serving)
                    continue
                self.reap()
        finally:
            self.stop()
            ignore_stop_signals()  # one more SIGTERM/SIGHUP, held until now, must not end the clean-up
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)

    def replace_silent(self, limit: float) -> None:
        """Kill every worker that has not beaten for ``limit`` seconds (its loop or a token call is stuck, so
        SIGTERM would not be handled); :meth:`reap` then starts another in its place."""
        by_index = {index: pid for pid, index in self.workers.items()}
        for index, silent in self.heartbeats.silent(limit):
            self.heartbeats.forget(index)
            pid = by_index.get(index)
            if pid is None:
                continue
            log.error("worker %d (pid %d) has not beaten for %.0fs (its event loop or a token call is stuck); "
                      "killing it so that another takes its place", index, pid, silent)  # fmt: skip
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> None:
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            index = self.workers.pop(pid, None)
            self._forget(pid)
            if index is None:
                continue
            metrics.process_dead(pid)
            self.heartbeats.forget(index)
            if self.share is not None:
                self.share.leave(index)  # it may have died holding connections, or none
            log.warning("worker %d (pid %d) ended with status %d; restarting it", index, pid, status)
            self._restart(index)

    def _restart(self, index: int) -> None:
        """Start worker ``index`` again, within the restart budget. A start that fails on the token (e.g.
        SoftHSM's GeneralError while another process logs in) is tried again; a rejected PIN or a config
        error ends the agent (with its exit status)."""
        while not self.stop_pending():
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < _RESTART_WINDOW] + [now]
            if len(self.restarts) > _MAX_RESTARTS:
                raise TokenError(f"workers keep dying ({len(self.restarts)} in {_RESTART_WINDOW:g}s); giving up")
            try:
                log.info("worker %d restarted (pid %d)", index, self.spawn(index))
                return
            except (PinRejected, ConfigError):
                raise
            except TokenError as e:
                log.warning("worker %d could not start (%s); trying again", index, e.message)
                time.sleep(0.5)

    def reload(self) -> None:
        """Check the new config here first (and keep it for workers started later), then have every worker
        apply it and wait for each one's answer; the outcome goes to ``dfns-agent reload``
        (agent/daemon/reload_status.py). A config refused by any worker is a failed reload."""
        self.reloads += 1
        try:
            fresh = load_config(self.config.path)
            dfns = read_dfns_tokens(fresh)
        except AgentError as e:
            log.error("reload failed; keeping the previous configuration: %s", e.message)
            self._reloaded(False, e.message)
            return
        waiting = {fd: pid for pid, fd in self.control.items() if pid in self.workers}
        self.signal_all(signal.SIGHUP)
        refusals: list[str] = []
        deadline = time.monotonic() + _RELOAD_WAIT
        while waiting and (left := deadline - time.monotonic()) > 0:
            for fd in select.select(list(waiting), [], [], left)[0]:
                pid = waiting.pop(fd)
                line = _read_line(fd)
                if line.startswith(_REFUSED):
                    refusals.append(line[len(_REFUSED) :].decode("utf-8", "replace").strip())
                elif not line.startswith(_RELOADED):
                    refusals.append(f"worker pid {pid} ended during the reload")
        if waiting:
            refusals.append(f"{len(waiting)} worker(s) did not answer within {_RELOAD_WAIT:g}s")
        if refusals:
            self._reloaded(False, refusals[0])
            return
        # Workers started from now on get the new credentials, policy and Dfns tokens; what only a restart
        # changes stays as the running workers have it (a restarted worker must append to the same audit log).
        self.config = as_reloaded(self.config, fresh)[0]
        self.dfns = dfns
        self._reloaded(True, f"{len(fresh.credentials)} credential(s) in {len(self.workers)} workers")

    def _reloaded(self, ok: bool, message: str) -> None:
        if ok:
            log.info("new configuration applied by every worker: %s", message)
        reload_status.write(os.getpid(), reload_status.ReloadOutcome(self.reloads, ok, message))

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
        for pid in list(self.control):
            self._forget(pid)


def _read_line(fd: int) -> bytes:
    """One line a worker wrote (a single atomic write), or b"" at end of file (the worker is gone)."""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
