"""Start-up and shut-down of ``dfns-agent serve``.

Order matters: the process is hardened first, then the socket is claimed (passed by systemd, or bound
here: a second agent on the same path fails before touching the token or asking for a PIN), then the PIN
is read, and each serving process (this one, or pre-forked workers) logs in exactly once, finds the keys
and opens the audit log (``agent/daemon/worker.py``). Only then does the agent print where it listens,
tell systemd READY=1 and start answering. At exit it removes the socket it bound (one systemd passed stays)
and its metrics directory.

SIGTERM or SIGINT at any moment, start-up included, is a normal stop: the agent logs ``stopped``, removes
the socket file it bound and its metrics directory, stops every worker it started, and exits with status 0
(what systemd expects of a SIGTERM). While it starts, the signal interrupts whatever it waits for (the PIN,
the login); once serving, the event loop (or the supervisor) drains and stops; while it stops, further
signals are ignored so the clean-up finishes. A SIGHUP before the agent serves is held and then reloads.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

from agent.config import Config
from agent.core import metrics
from agent.daemon import reload_status
from agent.daemon.hardening import harden_process
from agent.daemon.limits import raise_open_files_limit
from agent.daemon.supervisor import Supervisor
from agent.daemon.worker import (
    StopRequested,
    held_stop_signals,
    ignore_stop_signals,
    read_dfns_tokens,
    serve_worker,
    stop_on_signal,
)
from agent.errors import ConfigError
from agent.paths import socket_path_for
from agent.secret import read_pin
from agent.transport import systemd
from agent.transport.listener import bind_unix_socket, remove_socket, socket_inode

log = logging.getLogger(__name__)


def run(config: Config, *, socket_override: str | Path | None = None, out: TextIO = sys.stdout) -> None:
    """Run the agent until SIGTERM or SIGINT (then return normally, whenever it came). Raises
    :class:`agent.errors.AgentError` on start-up failures."""
    started = time.time()  # the agent's start: health's uptime counts from it (reloads and workers keep it)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # held until a serving loop reloads on it
    stop_on_signal()
    owned: tuple[Path, int] | None = None  # the socket file to remove at exit (systemd's is not ours)
    sock: socket.socket | None = None
    metrics_dir: Path | None = None
    try:
        harden_process()
        raise_open_files_limit()  # before the workers fork: they inherit it
        _warn_unmatchable_exes(config)
        if not config.credentials:
            raise ConfigError(f"{config.path or 'config'}: no [[credential]] configured; nothing to sign with")
        _check_module(config)
        with held_stop_signals():  # a file made here is always one the clean-up knows about
            sock = systemd.listen_socket()
            if sock is None:
                path = socket_path_for(config, socket_override)
                sock = bind_unix_socket(path)
                owned = (path, socket_inode(path))
        pin = read_pin(config.token)
        dfns = read_dfns_tokens(config)
        with held_stop_signals():
            metrics_dir = metrics.prepare()  # before any worker imports prometheus_client
        if config.server.workers == 1:
            reloads = itertools.count(1)

            def reloaded(ok: bool, message: str) -> None:
                reload_status.write(os.getpid(), reload_status.ReloadOutcome(next(reloads), ok, message))

            serve_worker(config, pin, dfns, sock, out, announce=True, started=started, on_reload=reloaded)
        else:
            Supervisor(config, pin, dfns, sock, out, started=started).run()
        log.info("stopped")
    except StopRequested as e:
        log.info("stopped (%s while starting)", signal.Signals(e.signo).name)
    finally:
        ignore_stop_signals()
        if owned is not None:
            remove_socket(*owned)
        if sock is not None:
            sock.close()
        if metrics_dir is not None:
            metrics.cleanup(metrics_dir)
        reload_status.remove(os.getpid())


def _check_module(config: Config) -> None:
    """A module path that names no file is a config error (exit status 2: the units do not restart the agent
    for it every few seconds), found before anything else starts. Later, while serving, a module gone for a
    moment (a package upgrade) is a token fault the agent recovers from."""
    module = config.token.module
    where = f"{config.path or 'config'}: [token] module"
    if not os.path.exists(module):
        raise ConfigError(f"{where}: PKCS#11 module {module} does not exist; install it or correct the path")
    if not os.path.isfile(module):
        raise ConfigError(f"{where}: PKCS#11 module {module} is not a regular file")


def _warn_unmatchable_exes(config: Config) -> None:
    """``exes`` selectors read /proc/PID/exe, which the kernel shows only for processes this agent may
    ptrace: its own uid's (for root, everyone's). Say so for rules that could select other users."""
    me = os.geteuid()
    if me == 0:
        return
    for rule in config.rules:
        if rule.exes and (not rule.uids or any(uid != me for uid in rule.uids)):
            log.warning(
                "policy rule %r selects executables (exes) but may match callers other than uid %d, whose "
                "/proc/PID/exe this agent cannot read: it never matches them; select them by uids/gids",
                rule.name,
                me,
            )
