"""``dfns-agent audit``: work with the agent's audit log offline (no agent or token involved)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent.cli.util import AUDIT_DEFAULT, CliError

if TYPE_CHECKING:
    from agent.core.checkpoint import Checkpoint, VerifyKey


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

    Give every file of the set (rotated ones too) or their directory. A directory stands for the files
    the agent writes there, whatever [audit] file is named: each rotated file, STEM-SEQ.SUFFIX (SEQ: 12
    or more digits, e.g. audit-000000001000.log), the live file STEM.SUFFIX of each, and any *.jsonl.
    Other files are left out; give a live file of another name that has not rotated yet by its path.

    The hash chain alone shows a record edited, inserted or deleted in the middle of the set; it cannot
    detect the last record altered, the last records cut off (truncation), records appended, or the whole
    chain rewritten. A checkpoint whose signature verifies with --public-key closes that gap up to its size:
    edits, deletions, a recomputed chain and truncation below it are detected. After the newest verified
    checkpoint only the chain holds, unless a newer checkpoint from the journal (--checkpoints) covers those
    records too.

    Exit status 1 when anything does not verify, a line that is not a JSON record included, and when the
    set holds no records (no files, or only empty ones): that proves nothing. Exit status 2 when an input
    cannot be used (a file that cannot be read, a --public-key that is not an Ed25519 or P-256 PEM), as for
    any usage error: then nothing was checked, which is not the verdict "does not verify".
    """
    from agent.core.audit_verify import UnreadableFile
    from agent.core.audit_verify import verify as verify_set

    key = _public_key(public_key) if public_key is not None else None
    external = [cp for f in checkpoint_files for cp in _checkpoints(f)]
    try:
        result = verify_set(list(paths), public_key=key, external=external, origin=origin)
    except UnreadableFile as e:
        raise CliError("unreadable_file", str(e), exit_code=2) from None
    for line in result.summary():
        click.echo(line)
    if not result.ok:
        sys.exit(1)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CliError("unreadable_file", f"cannot read {path}: {e.strerror or e}", exit_code=2) from None


def _public_key(path: Path) -> VerifyKey:
    """The checkpoint key from a PEM file; a file that is not one is a usage error, not a verdict."""
    from cryptography.exceptions import UnsupportedAlgorithm

    from agent.core.checkpoint import load_public_key
    from agent.errors import UnsupportedKey

    pem = _read(path)
    try:
        return load_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as e:
        why = "not a PEM public key" if isinstance(e, ValueError) else f"a key of no supported type ({e})"
        message = f"--public-key {path}: {why}; `dfns-agent keys public --label LABEL` writes the right one"
    except UnsupportedKey as e:
        message = f"--public-key {path}: {e.message}"
    raise CliError("invalid_public_key", message, exit_code=2)


def _checkpoints(path: Path) -> list[Checkpoint]:
    """The checkpoints in a ``--checkpoints`` file (anything else in it is skipped)."""
    from agent.core.checkpoint import find_in_text

    text = _read(path).decode(errors="replace")
    try:
        return list(find_in_text(text))
    except RecursionError:  # a JSON line nested too deep for the parser: refused rather than half read
        raise CliError(
            "invalid_checkpoints", f"--checkpoints {path}: a JSON line nested too deep to read", exit_code=2
        ) from None
