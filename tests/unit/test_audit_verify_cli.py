"""``dfns-agent audit verify`` on what operators actually hand it: a directory of a log not named
``*.jsonl``, an empty set, and bad input (a key file that is not a key, an unreadable file, a line nested
too deep), each with a verdict or a one-line error and the exit status the help promises, never a
traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePath

import pytest
from click.testing import CliRunner, Result

from agent.cli.main import main
from agent.config import AuditConfig
from agent.core import audit_verify
from agent.core.audit import AuditLog
from agent.core.audit_verify import audit_files, verify
from agent.dev.testing import ROOT
from tests.unit.test_audit_chain import Fields, lines
from tests.unit.test_cli_help import help_of


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["audit", "verify", *map(str, args)])


def rotated_log(directory: Path, name: str = "audit.log") -> tuple[Path, list[Path]]:
    """A log named ``name`` that rotated at least twice: the live file and its rotated files."""
    live = directory / name
    log = AuditLog(live, settings=AuditConfig(rotate_bytes=900, checkpoint_every=0, checkpoint_interval=0))
    try:
        for i in range(13):
            log.record(Fields(event="sign", i=i, pad="p" * 80))
    finally:
        log.close()
    archives = sorted(p for p in directory.iterdir() if p != live)
    stem, suffix = PurePath(name).stem, PurePath(name).suffix
    assert len(archives) >= 2 and all(
        re.fullmatch(rf"{re.escape(stem)}-\d{{12}}{re.escape(suffix)}", p.name) for p in archives
    )
    assert all(len(lines(p)) >= 3 for p in archives) and len(lines(live)) >= 2
    return live, archives


def tamper(path: Path, line: int) -> None:
    """Edit record ``line`` (0-based) of ``path``: the chain breaks at the next one."""
    raw = path.read_bytes().splitlines(keepends=True)
    raw[line] = raw[line].replace(b'"time":"', b'"time":"edited ', 1)
    path.write_bytes(b"".join(raw))


# -- which files a directory stands for ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["audit.log", "audit", "trail.v2.txt"])
def test_a_directory_stands_for_the_live_file_and_its_rotated_files_whatever_their_suffix(
    tmp_path: Path, name: str
) -> None:
    live, archives = rotated_log(tmp_path, name)
    (tmp_path / f"{name}.next").write_bytes(live.read_bytes())  # a rotation cut short leaves this: not in the set
    (tmp_path / "notes.txt").write_text("kept by the operator\n")
    assert set(audit_files([tmp_path])) == {live, *archives}
    ok = run(tmp_path)
    assert ok.exit_code == 0 and f"in {len(archives) + 1} file(s), chain intact" in ok.output, ok.output
    tamper(archives[0], 1)
    broken = run(tmp_path)
    assert broken.exit_code == 1 and "BROKEN at line 3" in broken.output, broken.output
    assert str(archives[0]) in broken.output


def test_a_tampered_live_file_breaks_the_directory_too(tmp_path: Path) -> None:
    live, _ = rotated_log(tmp_path)
    tamper(live, 0)
    r = run(tmp_path)
    assert r.exit_code == 1 and r.output.startswith(f"BROKEN at line 2: {live}: prev does not match"), r.output
    assert not verify([tmp_path]).ok


def test_rotated_names_are_what_the_agent_writes() -> None:
    live_name = audit_verify.live_name
    assert live_name("audit-000000001000.log") == "audit.log"
    assert live_name("audit-0000000010000000.jsonl") == "audit.jsonl"  # seq past 12 digits
    assert live_name("audit-000000001000") == "audit"
    assert live_name("a-b-000000000007.log") == "a-b.log"
    for other in ("audit.log", "audit-2024.log", "audit.log.next", "-000000001000.log", "audit-00000000100x.log"):
        assert live_name(other) is None, other


# -- an empty set proves nothing ----------------------------------------------------------------------


def test_a_directory_without_audit_files_fails(tmp_path: Path) -> None:
    (tmp_path / "audit.log").write_bytes(b'{"seq": 1}\n')  # a live file of another name, never rotated
    r = run(tmp_path)
    assert r.exit_code == 1 and r.output.startswith("EMPTY: no audit files in"), r.output
    assert "give a live file of another name" in r.output


def test_a_set_without_records_fails(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").touch()
    for path in (tmp_path, tmp_path / "audit.jsonl"):
        r = run(path)
        assert r.exit_code == 1 and r.output.startswith("EMPTY: no records in 1 file(s)"), r.output
    assert verify([]).empty and not verify([]).ok


# -- bad input: a one-line error (exit 2) or a verdict (exit 1), never a traceback ----------------------


@pytest.mark.parametrize("pem", [b"garbage\n", b"", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
def test_a_public_key_file_that_is_not_a_key_is_a_usage_error(tmp_path: Path, pem: bytes) -> None:
    live, _ = rotated_log(tmp_path)
    key = tmp_path / "key.pem"
    key.write_bytes(pem)
    r = run(live, "--public-key", key)
    assert r.exit_code == 2, (r.exit_code, r.exception)
    assert r.stderr == (
        f"dfns-agent: invalid_public_key: --public-key {key}: not a PEM public key; "
        "`dfns-agent keys public --label LABEL` writes the right one\n"
    ), r.stderr


def test_an_rsa_public_key_is_a_usage_error_too(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    live, _ = rotated_log(tmp_path)
    key = tmp_path / "rsa.pem"
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    key.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = run(live, "--public-key", key)
    assert r.exit_code == 2 and r.stderr.startswith("dfns-agent: invalid_public_key: "), r.stderr


@pytest.mark.parametrize("line", [0, 2])
def test_a_line_nested_too_deep_is_a_broken_line(tmp_path: Path, line: int) -> None:
    live, _ = rotated_log(tmp_path)
    raw = live.read_bytes().splitlines(keepends=True)
    raw.insert(line, b"[" * 100_000 + b"\n")
    live.write_bytes(b"".join(raw))
    result = verify(live)
    assert not result.ok and result.first_bad_line == line + 1 and "nested too deep" in str(result.reason)
    r = run(live)
    assert r.exit_code == 1 and not isinstance(r.exception, RecursionError), r.exception
    assert r.output.startswith(f"BROKEN at line {line + 1}: not a JSON record (nested too deep"), r.output


def test_a_checkpoints_file_nested_too_deep_is_a_usage_error(tmp_path: Path) -> None:
    live, _ = rotated_log(tmp_path)
    journal = tmp_path / "journal.txt"
    journal.write_bytes(b"{" + b'"a":{' * 100_000 + b"\n")
    r = run(live, "--checkpoints", journal)
    assert r.exit_code == 2 and "dfns-agent: invalid_checkpoints: " in r.stderr, (r.stderr, r.exception)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="acting as nobody needs root")
def test_an_unreadable_file_in_a_readable_directory_is_a_one_line_error(short_dir: Path) -> None:
    live, archives = rotated_log(short_dir, "audit.jsonl")
    short_dir.chmod(0o755)  # nobody may list it and read every file but one
    for p in (live, *archives):
        p.chmod(0o644)
    archives[0].chmod(0o600)
    r = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        + [sys.executable, "-m", "agent", "audit", "verify", str(short_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr == f"dfns-agent: unreadable_file: cannot read {archives[0]}: Permission denied\n", r.stderr


def test_the_help_says_which_files_a_directory_holds_and_what_each_exit_status_means() -> None:
    flat = " ".join(help_of("audit", "verify").split())
    assert "STEM-SEQ.SUFFIX" in flat and "the live file STEM.SUFFIX of each, and any *.jsonl" in flat, flat
    assert "Exit status 1 when anything does not verify" in flat and "Exit status 2 when an input" in flat


def test_verified_records_are_the_ones_written(tmp_path: Path) -> None:
    live, archives = rotated_log(tmp_path)
    result = verify([tmp_path])
    written = [r for p in (*archives, live) for r in lines(p)]
    assert result.ok and result.records == len(written) and result.last_seq == written[-1]["seq"]
