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

from agent.config import Config
from agent.core import metrics
from agent.daemon.worker import (
    LOOP_SIGNALS,
    STOP_SIGNALS,
    DfnsSettings,
    check_stop,
    ignore_stop_signals,
    serve_worker,
)
from agent.errors import AgentError, ConfigError, TokenError
from agent.secret import Secret
from agent.transport import systemd

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MAX_RESTARTS = 5  # within _RESTART_WINDOW seconds, then give up and let the service manager restart us
_RESTART_WINDOW = 60.0
_STOP_CHECK = 0.05  # how often a supervisor waiting for a worker to start looks for SIGTERM/SIGINT


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
                signal.pthread_sigmask(signal.SIG_SETMASK, LOOP_SIGNALS)
                ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

                def ready() -> None:
                    _tell(write_end, b"ok")
                    os.close(write_end)

                serve_worker(
                    self.config,
                    self.pin,
                    self.dfns,
                    self.sock,
                    self.out,
                    announce=index == 0,
                    ready=ready,
                    started=self.started,
                )
            except AgentError as e:
                code = 2 if isinstance(e, ConfigError) else 1
                _tell(write_end, e.message.encode("utf-8", "replace"))
            except BaseException:  # noqa: BLE001 - a worker must never fall back into the supervisor's code
                log.exception("worker %d failed", index)
                code = 70
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        self.workers[pid] = index  # from now on stop() stops it, even while it starts
        with os.fdopen(read_end, "rb") as pipe:
            while not select.select([pipe], [], [], _STOP_CHECK)[0]:
                if self.stop_pending():
                    return pid  # it starts (its signals held) and is stopped with the rest
            answer = pipe.read().decode("utf-8", "replace")
        if answer != "ok":
            self.workers.pop(pid, None)
            os.waitpid(pid, 0)
            raise TokenError(answer or f"worker {index} exited during start-up")
        return pid

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
            ignore_stop_signals()  # one more SIGTERM/SIGHUP, held until now, must not end the clean-up
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
            if not self.stop_pending():
                log.info("worker %d restarted (pid %d)", index, self.spawn(index))

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
