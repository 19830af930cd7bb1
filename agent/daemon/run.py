"""Start-up and shut-down of ``dfns-agent serve``.

Order matters: the process is hardened first, then the socket is claimed (passed by systemd, or bound
here: a second agent on the same path fails before touching the token or asking for a PIN), then the PIN
is read, and each serving process (this one, or pre-forked workers) logs in exactly once, finds the keys
and opens the audit log (``agent/daemon/worker.py``). Only then does the agent print where it listens,
tell systemd READY=1 and start answering. At exit it removes the socket it bound (one systemd passed stays).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

from agent.config import Config
from agent.core import metrics
from agent.daemon.hardening import harden_process
from agent.daemon.supervisor import Supervisor
from agent.daemon.worker import read_dfns_tokens, serve_worker
from agent.errors import ConfigError
from agent.paths import socket_path_for
from agent.secret import read_pin
from agent.transport import systemd
from agent.transport.listener import bind_unix_socket, remove_socket, socket_inode

log = logging.getLogger(__name__)


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
