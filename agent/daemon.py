"""Start-up, reload and shut-down of ``dfns-agent serve``.

Order matters: the process is hardened first, then the socket is claimed (a second agent on the same path
fails before touching the token or asking for a PIN), then the PIN is read and the token logged in exactly
once, the keys found and the audit log opened. Only then does the agent print where it listens and start
answering. SIGTERM/SIGINT drain in-flight requests (bounded), log out and remove the socket; SIGHUP
reloads credentials, Dfns settings and policy without touching the token session, and a bad config on
reload keeps the old one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from aiohttp import web

from agent import __version__
from agent.audit import AuditLog, default_audit_path
from agent.config import Config, DfnsConfig, load_config
from agent.errors import AgentError, ConfigError
from agent.hardening import harden_process
from agent.listener import bind_unix_socket, default_socket_path, remove_socket, socket_inode
from agent.policy import Policy
from agent.secret import Secret, read_pin, read_secret
from agent.server import STATE, AgentState, Limits, create_app, serve
from agent.service import SigningService
from agent.token import Token

log = logging.getLogger(__name__)


def socket_path_for(config: Config | None, override: str | Path | None = None) -> Path:
    if override:
        return Path(override)
    if config is not None and config.server.socket is not None:
        return config.server.socket
    return default_socket_path()


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
    return AuditLog(config.audit.file or default_audit_path())


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
    path = socket_path_for(config, socket_override)
    sock = bind_unix_socket(path)
    inode = socket_inode(path)
    token: Token | None = None
    audit: AuditLog | None = None
    try:
        pin = read_pin(config.token)
        token = Token.open(config.token, pin)
        del pin
        audit = open_audit(config)
        service = SigningService.from_config(token, config.credentials, audit)
        token.expect_keys([c.key for c in service.credentials])
        dfns = read_dfns_tokens(config)
        token.start_probe()
        _announce(out, path, token, service, audit)
        threads = config.server.sign_threads
        with ThreadPoolExecutor(max(threads, 1), thread_name_prefix="sign") as pool:
            state = AgentState(service, Policy(config.rules), dfns, pool if threads else None)
            app = create_app(state, limits_for(config))
            asyncio.run(_serve_until_signalled(app, sock, config, token, audit))
        log.info("stopped")
    finally:
        remove_socket(path, inode)
        sock.close()
        if token is not None:
            token.close()
        if audit is not None:
            audit.close()


def reload(state: AgentState, config: Config, token: Token, audit: AuditLog | None) -> Config:
    """Apply a re-read config's credentials, Dfns settings and policy; raises (keeping the old) on error."""
    fresh = load_config(config.path)
    if fresh.token != config.token:
        log.warning("token settings changed in %s; restart the agent to apply them", config.path)
    service = SigningService.from_config(token, fresh.credentials, audit)
    if not service.credentials:
        raise ConfigError("no [[credential]] configured")
    dfns = read_dfns_tokens(fresh)
    state.replace(service, Policy(fresh.rules), dfns)
    token.expect_keys([c.key for c in service.credentials])
    log.info("reloaded %s: %d credential(s), %d policy rule(s)", fresh.path, len(service.credentials), len(fresh.rules))
    return fresh


async def _serve_until_signalled(
    app: web.Application, sock: socket.socket, config: Config, token: Token, audit: AuditLog | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    current = [config]

    async def on_hup() -> None:
        try:
            current[0] = await loop.run_in_executor(None, reload, app[STATE], current[0], token, audit)
        except AgentError as e:
            log.error("reload failed; keeping the previous configuration: %s", e.message)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(on_hup()))
    await serve(app, sock, stop, shutdown_timeout=config.server.shutdown_timeout)


def _announce(out: TextIO, path: Path, token: Token, service: SigningService, audit: AuditLog | None) -> None:
    lines = [
        f"dfns-agent {__version__} listening on {path}",
        f"{token.name}, {len(service.credentials)} credential(s):",
    ]
    for c in service.credentials:
        lines.append(f"  {c.name}: credId {c.cred_id}, key {c.key.label!r} ({c.key.type_name}), {c.key.fingerprint}")
        lines.append(c.key.public_pem.rstrip("\n"))
    lines.append(f"audit log: {audit.path if audit else 'disabled'}")
    lines.append(f"try: curl --unix-socket {path} http://agent/v1/health")
    out.write("\n".join(lines) + "\n")
    out.flush()
