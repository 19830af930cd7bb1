"""``dfns-agent audit``: work with the agent's audit log offline (no agent or token involved)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
def audit() -> None:
    """Work with the agent's tamper-evident audit log."""


@audit.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def verify(file: str) -> None:
    """Check the hash chain of an audit log; report the first broken record. Exit 1 if broken."""
    from agent.core.audit import verify as verify_chain

    result = verify_chain(Path(file))
    if result.ok:
        click.echo(f"ok: {result.records} record(s), chain intact")
        return
    click.echo(f"BROKEN at line {result.first_bad_line}: {result.reason} ({result.records} record(s) before it)")
    sys.exit(1)
