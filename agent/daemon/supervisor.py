"""Pre-forked workers sharing the listening socket, and the supervisor that starts, restarts and stops them."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import TextIO

from agent.config import Config, as_reloaded, config_from_text, find_config, read_config
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
_STOP_CHECK = 0.05  # how often a supervisor waiting for a worker (to start, to reload) looks for SIGTERM/SIGINT
# How long a reload waits for every worker's answer; at most the watchdog timeout. A worker that has not
# answered by then is replaced (see Supervisor.reload).
_RELOAD_WAIT = 60.0

# A worker's lines to the supervisor on its control pipe (each one write, well under PIPE_BUF: atomic).
_READY = b"ready\n"
_RELOADED = b"reloaded "
_REFUSED = b"refused "
_START_FAILED = b"failed "  # + the exit status class, the error's code, the message (separated by spaces)


def _start_error(line: bytes, index: int) -> AgentError:
    """The error a worker's start-up failure is re-raised as in the supervisor: of the same exit class, so a
    rejected PIN or a config error ends the agent with the status systemd's units look for, and with the
    worker's own code (``audit_unavailable`` is not a ``token_error``)."""
    text = line.decode("utf-8", "replace").rstrip("\n")
    if not text.startswith(_START_FAILED.decode()):
        return TokenError(f"worker {index} exited during start-up")
    status, _, rest = text[len(_START_FAILED) :].partition(" ")
    code, _, message = rest.partition(" ")
    kind = {str(int(ExitStatus.PIN)): PinRejected, str(int(ExitStatus.CONFIG)): ConfigError}.get(status, TokenError)
    return kind(message or f"worker {index} exited during start-up", code=code or None)


def _reload_answer(data: bytes, seq: int) -> tuple[bool, str] | None:
    """A worker's answer to reload ``seq`` in what its control pipe gave (applied, and what or why), or None.
    A worker that could not even learn which reload it answers says seq 0."""
    for line in data.split(b"\n"):
        for tag, applied in ((_RELOADED, True), (_REFUSED, False)):
            if line.startswith(tag):
                number, _, message = line[len(tag) :].decode("utf-8", "replace").partition(" ")
                if number in ("0", str(seq)):
                    return applied, message.strip()
    return None


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
        self.watchdog_every = systemd.watchdog_interval()  # seconds between WATCHDOG=1 pings, or None
        self.pinged = time.monotonic()
        # Mapped before the first fork: how the workers share the socket's connections (agent/transport/share.py).
        self.share = ConnectionShare(config.server.workers) if config.server.workers > 1 else None
        # And whether each still serves (agent/daemon/liveness.py): judged on every wake-up below.
        self.heartbeats = Heartbeats(config.server.workers)

    def spawn(self, index: int) -> int:
        read_end, write_end = os.pipe()
        supervisor = os.getpid()
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

                answering = [0]  # the reload this worker answers (0: it could not tell which)

                def staged(path: Path | None) -> Config:
                    """What the supervisor read and validated for this reload, not the file as it is now."""
                    answering[0] = 0
                    try:
                        seq, text = reload_status.read_staged(supervisor)
                    except (OSError, ValueError) as e:
                        where = reload_status.staged_path(supervisor)
                        raise ConfigError(f"no configuration staged by the supervisor in {where}: {e}") from None
                    answering[0] = seq
                    return config_from_text(text, path if path is not None else find_config())

                def reloaded(ok: bool, message: str) -> None:
                    head = (_RELOADED if ok else _REFUSED) + f"{answering[0]} ".encode()
                    _tell(write_end, head + message.encode("utf-8", "replace")[:400] + b"\n")

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
                    read_config=staged,
                )
            except AgentError as e:
                code = exit_status_for(e)
                said = f"{code} {e.code} {e.message}".encode("utf-8", "replace")[:3000]
                _tell(write_end, _START_FAILED + said + b"\n")
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
            self.keep_alive()
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

    def ping(self) -> None:
        if self.watchdog_every is not None:
            systemd.watchdog()
            self.pinged = time.monotonic()

    def keep_alive(self) -> None:
        """While the supervisor waits for workers (one starting, a reload): the watchdog still gets its pings."""
        if self.watchdog_every is not None and time.monotonic() - self.pinged >= self.watchdog_every:
            self.ping()

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
            interval = self.watchdog_every
            limit = self.config.token.stuck_limit
            wake = min(x for x in (interval, beat_interval(limit) if limit else None, 3600.0) if x is not None)
            while True:
                # On every wake-up, and at least every `wake` seconds: replace wedged workers, ping systemd.
                if limit:
                    self.replace_silent(limit)
                self.ping()
                if (timed := signal.sigtimedwait(wanted, wake)) is None:
                    continue
                info = timed
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    systemd.stopping()
                    break
                if info.si_signo == signal.SIGHUP:
                    systemd.reloading()
                    self.reload()
                    if not self.stop_pending():  # else the next wait takes the stop signal
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

    def _gone(self, pid: int) -> int | None:
        """Forget worker ``pid``, which has been waited for; its index, or None if it was not one."""
        index = self.workers.pop(pid, None)
        self._forget(pid)
        if index is None:
            return None
        metrics.process_dead(pid)
        self.heartbeats.forget(index)
        if self.share is not None:
            self.share.leave(index)  # it may have died holding connections, or none
        return index

    def reap(self) -> None:
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            index = self._gone(pid)
            if index is None:
                continue
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
        """Read and check the new config here, hand that very text to every worker (agent/daemon/reload_status.py
        stages it) and wait for each one's answer, keeping the watchdog fed meanwhile. One outcome for all:

        - at least one worker applied it: it is the agent's config from now on (workers started later get it
          too), and every worker that refused it, ended or did not answer in time is replaced by one started
          on it;
        - none did: the previous config stays, in every worker (one that did not answer is replaced).

        The outcome, naming what was replaced and why, goes to ``dfns-agent reload``."""
        self.reloads += 1
        me = os.getpid()
        try:
            fresh, text = read_config(self.config.path)
            dfns = read_dfns_tokens(fresh)
        except AgentError as e:
            log.error("reload failed; keeping the previous configuration: %s", e.message)
            self._reloaded(False, e.message)
            return
        try:
            reload_status.stage(me, self.reloads, text)
        except OSError as e:
            message = f"cannot hand the configuration to the workers in {reload_status.staged_path(me)}: {e.strerror}"
            log.error("reload failed; keeping the previous configuration: %s", message)
            self._reloaded(False, message)
            return
        try:
            self._reload_workers(fresh, dfns)
        except BaseException:
            self._reloaded(False, "the supervisor failed while replacing workers; see its log")
            raise
        finally:
            reload_status.unstage(me)

    def _reload_wait(self) -> float:
        if self.watchdog_every is None:
            return _RELOAD_WAIT
        return min(_RELOAD_WAIT, 2 * self.watchdog_every)  # the watchdog's timeout

    def _reload_workers(self, fresh: Config, dfns: DfnsSettings) -> None:
        seq, wait, limit = self.reloads, self._reload_wait(), self.config.token.stuck_limit
        waiting = {fd: pid for pid, fd in self.control.items() if pid in self.workers}
        for fd in waiting:  # what a worker said outside a reload (a SIGHUP sent to it directly) is no answer
            while select.select([fd], [], [], 0)[0] and _read_line(fd):
                pass
        for pid in waiting.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        applied: list[int] = []
        refused: dict[int, str] = {}  # pid -> why
        deadline = time.monotonic() + wait
        while waiting and (left := deadline - time.monotonic()) > 0 and not self.stop_pending():
            self.keep_alive()
            if limit:
                self.replace_silent(limit)  # killed: its pipe ends, and it counts as not having applied it
            for fd in select.select(list(waiting), [], [], min(left, _STOP_CHECK))[0]:
                data = _read_line(fd)
                answer = _reload_answer(data, seq)
                if answer is None and data:
                    continue  # not an answer to this reload
                pid = waiting.pop(fd)
                name = f"worker {self.workers.get(pid, '?')} (pid {pid})"
                if answer is None:
                    refused[pid] = f"{name} ended during the reload"
                elif answer[0]:
                    applied.append(pid)
                else:
                    refused[pid] = f"{name} refused it: {answer[1]}"
        if self.stop_pending():
            self._reloaded(False, "the agent is stopping")
            return
        silent = {pid: f"worker {self.workers.get(pid, '?')} (pid {pid}) did not answer within {wait:g}s"
                  for pid in waiting.values()}  # fmt: skip
        if applied or not refused:
            # Validated here and applied by a worker: the agent's config now, for every worker.
            self.config = as_reloaded(self.config, fresh)[0]
            self.dfns = dfns
            odd = {**refused, **silent}
            for why in odd.values():
                log.warning("reload: %s; replacing it with a worker started on the new configuration", why)
            self._replace(odd, graceful=set(refused))
            message = f"{len(fresh.credentials)} credential(s) in {len(self.workers)} workers"
            if odd:
                message += f" ({'; '.join(odd.values())}: replaced by a worker started on the new configuration)"
            self._reloaded(True, message)
            return
        # No worker applied it: each one still serves the previous config, but one that did not answer might
        # yet apply it; a worker started on the previous config takes its place.
        for why in silent.values():
            log.warning("reload: %s; replacing it with a worker started on the previous configuration", why)
        self._replace(silent, graceful=set())
        message = "; ".join(refused.values())
        if silent:
            message += f" ({'; '.join(silent.values())}: replaced by a worker started on the previous configuration)"
        log.error("reload failed; keeping the previous configuration: %s", message)
        self._reloaded(False, message)

    def _replace(self, pids: Collection[int], graceful: Collection[int]) -> None:
        """End workers ``pids`` (SIGTERM, and a drain, for those in ``graceful``, which still serve; SIGKILL for
        the others, which may be wedged or stopped) and start another in each one's place, on ``self.config``."""
        left = set(pids)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if pid in graceful else signal.SIGKILL)
        deadline = time.monotonic() + self.config.server.shutdown_timeout + 5.0
        while left and not self.stop_pending():
            self.keep_alive()
            for pid in list(left):
                try:
                    done = os.waitpid(pid, os.WNOHANG)[0]
                except ChildProcessError:
                    done = pid
                if done:
                    left.discard(pid)
                    index = self._gone(pid)
                    if index is not None:
                        self._restart(index)
            if left and time.monotonic() > deadline:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if left:
                time.sleep(_STOP_CHECK)

    def _reloaded(self, ok: bool, message: str) -> None:
        if ok:
            log.info("new configuration in force in every worker: %s", message)
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
