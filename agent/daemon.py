"""Start-up and shut-down of ``dfns-agent serve``.

Order matters: the socket is claimed first (a second agent on the same path fails before touching the
token or asking for a PIN), then the PIN is read and the token logged in exactly once, then the keys are
found. Only then does the agent print where it listens and start answering.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from agent import __version__
from agent.config import Config, DfnsConfig
from agent.errors import ConfigError
from agent.listener import bind_unix_socket, default_socket_path, remove_socket, socket_inode
from agent.secret import Secret, read_pin, read_secret
from agent.server import create_app, serve
from agent.service import SigningService
from agent.token import Token

log = logging.getLogger(__name__)


def socket_path_for(config: Config | None, override: str | Path | None = None) -> Path:
    if override:
        return Path(override)
    if config is not None and config.server.socket is not None:
        return config.server.socket
    return default_socket_path()


def run(config: Config, *, socket_override: str | Path | None = None, out: TextIO = sys.stdout) -> None:
    """Run the agent until SIGTERM or SIGINT. Raises :class:`agent.errors.AgentError` on start-up failures."""
    if not config.credentials:
        raise ConfigError(f"{config.path or 'config'}: no [[credential]] configured; nothing to sign with")
    path = socket_path_for(config, socket_override)
    sock = bind_unix_socket(path)
    inode = socket_inode(path)
    token: Token | None = None
    try:
        pin = read_pin(config.token)
        token = Token.open(config.token, pin)
        del pin
        service = SigningService.from_config(token, config.credentials)
        dfns = read_dfns_tokens(config)
        _announce(out, path, token, service)
        with ThreadPoolExecutor(config.server.sign_threads, thread_name_prefix="sign") as pool:
            app = create_app(service, pool, max_body=config.server.max_body_bytes, dfns=dfns)
            asyncio.run(_serve_until_signalled(app, sock))
        log.info("stopped")
    finally:
        remove_socket(path, inode)
        sock.close()
        if token is not None:
            token.close()


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


async def _serve_until_signalled(app, sock) -> None:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, sock, stop)


def _announce(out: TextIO, path: Path, token: Token, service: SigningService) -> None:
    lines = [
        f"dfns-agent {__version__} listening on {path}",
        f"{token.name}, {len(service.credentials)} credential(s):",
    ]
    for c in service.credentials:
        lines.append(f"  {c.name}: credId {c.cred_id}, key {c.key.label!r} ({c.key.type_name}), {c.key.fingerprint}")
        lines.append(c.key.public_pem.rstrip("\n"))
    lines.append(f"try: curl --unix-socket {path} http://agent/v1/health")
    out.write("\n".join(lines) + "\n")
    out.flush()
