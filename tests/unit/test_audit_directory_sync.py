"""A record fsynced into a file that was just created is durable only once the file's directory entry is
(fsync(2): "Calling fsync() does not necessarily ensure that the entry in the directory containing the file
has also reached disk"), and likewise for a directory just made for it. No test can cut the power, so this
one watches which file descriptors ``os.fsync`` is called on (a spy that passes every call through to the
real fsync, not a fault): the new log's directory, and the directory the agent made, must be synced before
the first record is confirmed."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from agent.core.audit import AuditLog
from tests.unit.test_audit_chain import Fields


def test_a_new_log_and_the_directory_made_for_it_are_synced_before_the_first_record_is_confirmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state" / "dfns-agent" / "audit.jsonl"
    real_fsync = os.fsync
    synced_directories: set[tuple[int, int]] = set()

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced_directories.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = AuditLog(path)
    try:
        log.record(Fields(event="sign"))
        confirmed = set(synced_directories)
    finally:
        log.close()

    def ident(p: Path) -> tuple[int, int]:
        st = os.stat(p)
        return st.st_dev, st.st_ino

    # The entry of audit.jsonl, and those of the two directories the agent created for it.
    for directory in (path.parent, path.parent.parent, tmp_path):
        assert ident(directory) in confirmed, directory
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("code", ["EINVAL", "EIO"])
def test_a_directory_the_file_system_cannot_sync_is_no_reason_to_stop_but_an_io_error_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """Some FUSE and network file systems answer fsync on a directory with EINVAL: nothing more can be done
    there (PostgreSQL's fsync_fname makes the same exception). EIO is a failing disk: no signing on it.
    The fault is injected (no local file system here refuses it), on directories only."""
    from agent.errors import AuditUnavailable

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if code == "EIO":
        with pytest.raises(AuditUnavailable, match="Input/output error"):
            AuditLog(tmp_path / "audit.jsonl")  # it opens the file, and so syncs the directory, at once
        return
    log = AuditLog(tmp_path / "audit.jsonl")
    try:
        log.record(Fields(event="sign"))
        assert (tmp_path / "audit.jsonl").read_bytes().count(b"\n") == 1
    finally:
        log.close()
