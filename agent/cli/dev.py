"""``dfns-agent dev-dfns``: a local Dfns-compatible API, for trying the agent without a Dfns account.

The server (``agent/dev/dfns_server.py``) and its aiohttp belong to the development install, not to the
product; the command is always listed, and says how to get it when they are missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.cli.util import CliError


@click.command("dev-dfns")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (plain HTTP: keep it loopback)."
)
@click.option(
    "--port",
    default=8400,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port to listen on; 0 picks a free one (the URL is printed).",
)
@click.option(
    "--service-account",
    "accounts",
    multiple=True,
    metavar="NAME=PEMFILE",
    help="Create a service account for this public key (repeatable). Its credId is the agent's default for "
    "that key, so a credential without cred_id matches it.",
)
@click.option("--tokens-dir", required=True, type=click.Path(file_okay=False), help="Where NAME.token files go (0600).")
@click.option(
    "--latency-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 10_000),
    help="Hold every request this long before answering, like a distant API (for benchmarks).",
)
def dev_dfns(host: str, port: int, accounts: tuple[str, ...], tokens_dir: str, latency_ms: float) -> None:
    """Run a local Dfns-compatible API (development only).

    For trying the agent without a Dfns account; state is in memory. It verifies signatures the way Dfns
    does, makes challenges and user actions single-use, and binds user actions to method, path and
    payload. Not for production.
    """
    from cryptography.hazmat.primitives import serialization

    from agent.dfns import cred_id_for_key

    try:
        from agent.dev.dfns_server import run
    except ImportError as e:
        raise CliError(
            "not_installed",
            f"dev-dfns belongs to the development install: pip install -e '.[dev]' from a checkout ({e})",
        ) from None

    parsed: list[tuple[str, Path, str | None]] = []
    for spec in accounts:
        name, sep, pem_file = spec.partition("=")
        if not sep or not name or not pem_file:
            raise click.BadParameter(f"{spec!r} is not NAME=PEMFILE", param_hint="--service-account")
        pem = Path(pem_file).read_bytes()
        spki = serialization.load_pem_public_key(pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        parsed.append((name, Path(pem_file), cred_id_for_key(spki)))
    run(host, port, parsed, Path(tokens_dir), sys.stdout, latency=latency_ms / 1000)
