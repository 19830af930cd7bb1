"""``dfns-agent audit``: work with the agent's audit log offline (no agent or token involved)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.cli.util import AUDIT_DEFAULT


@click.group(
    help="Work with the audit log offline.\n\n"
    f"The agent appends one hash-chained JSON line per signature or refusal to {AUDIT_DEFAULT}, "
    "with signed checkpoints when [audit] checkpoint_key is set."
)
def audit() -> None:
    pass


@audit.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM of the audit checkpoint key (dfns-agent keys public LABEL); without it signatures are not checked.",
)
@click.option(
    "--checkpoints",
    "checkpoint_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file with checkpoints kept outside the log: the agent's journal (journalctl -o cat), or notes.",
)
@click.option("--origin", help="Accept only checkpoints of this origin ([audit] checkpoint_origin).")
def verify(
    paths: tuple[Path, ...], public_key: Path | None, checkpoint_files: tuple[Path, ...], origin: str | None
) -> None:
    """Check audit files and their checkpoints.

    Give every file of the set (rotated ones too) or their directory.

    The hash chain alone shows a record edited, inserted or deleted in the middle of the set; it cannot
    detect the last record altered, the last records cut off (truncation), records appended, or the whole
    chain rewritten. A checkpoint whose signature verifies with --public-key closes that gap up to its size:
    edits, deletions, a recomputed chain and truncation below it are detected. After the newest verified
    checkpoint only the chain holds, unless a newer checkpoint from the journal (--checkpoints) covers those
    records too. Exit status 1 when anything does not verify.
    """
    from agent.core.audit_verify import verify as verify_set
    from agent.core.checkpoint import find_in_text, load_public_key

    key = load_public_key(public_key.read_bytes()) if public_key is not None else None
    external = [cp for f in checkpoint_files for cp in find_in_text(f.read_text(errors="replace"))]
    result = verify_set(list(paths), public_key=key, external=external, origin=origin)
    for line in result.summary():
        click.echo(line)
    if not result.ok:
        sys.exit(1)
