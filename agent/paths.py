"""Where the agent's files live by default: one rule shared by ``serve``, the CLI's clients and ``doctor``.

Kept apart from the daemon so that a client or a diagnostic can compute a path without importing the
server (and, through it, PKCS#11).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from agent.config import AuditConfig, Config


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/dfns-agent/agent.sock``, else a per-user directory under the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "dfns-agent" / "agent.sock"
    return Path(tempfile.gettempdir()) / f"dfns-agent-{os.geteuid()}" / "agent.sock"


def socket_path_for(config: Config | None, override: str | os.PathLike[str] | None = None) -> Path:
    """The socket ``serve`` binds: an explicit override, else ``[server] socket``, else the default."""
    if override:
        return Path(override)
    if config is not None and config.server.socket is not None:
        return config.server.socket
    return default_socket_path()


def default_audit_path() -> Path:
    """``$XDG_STATE_HOME/dfns-agent/audit.jsonl`` for users; ``/var/lib/dfns-agent/audit.jsonl`` for root."""
    if os.geteuid() == 0 and "XDG_STATE_HOME" not in os.environ:
        return Path("/var/lib/dfns-agent/audit.jsonl")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dfns-agent" / "audit.jsonl"


def audit_path_for(audit: AuditConfig) -> Path:
    """The audit log ``serve`` writes (and ``doctor`` checks): ``[audit] file``, else the default."""
    return audit.file or default_audit_path()
