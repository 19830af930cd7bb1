"""``dfns-agent audit``: work with the agent's audit log offline (no agent or token involved)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.cli.util import AUDIT_DEFAULT


@click.group(
    help="Work with the audit log offline.\n\n"
    f"The agent appends one hash-chained JSON line per signature or refusal to {AUDIT_DEFAULT}."
)
def audit() -> None:
    pass


@audit.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def verify(file: str) -> None:
    """Check an audit log's hash chain.

    Reports the first broken record and exits 1 if there is one. It detects a record edited, inserted or
    deleted in the middle of the log; it cannot detect the last record altered, the last records cut off
    (truncation), records appended, or the whole chain rewritten, since nothing outside the file anchors
    the chain's end.
    """
    from agent.core.audit import verify as verify_chain

    result = verify_chain(Path(file))
    if result.ok:
        click.echo(f"ok: {result.records} record(s), chain intact")
        return
    click.echo(f"BROKEN at line {result.first_bad_line}: {result.reason} ({result.records} record(s) before it)")
    sys.exit(1)
