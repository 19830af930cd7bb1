"""Rotation prepares the next live file under the name ``<file>.next`` before renaming it over the log.
Whatever already has that name (a symbolic or hard link that someone with write access to the directory
planted, e.g. a group-writable ``/var/log``, or a stale file) must not be opened and truncated: the agent
may run as root, and the name is only its scratch name. Real files, a real rotation."""

from __future__ import annotations

import json
import os
from pathlib import Path

from agent.config import AuditConfig
from agent.core.audit import AuditLog
from agent.core.audit_verify import verify
from tests.unit.test_audit_chain import Fields


def rotate_with_planted(tmp_path: Path, plant: str) -> tuple[Path, Path, bytes]:
    path = tmp_path / "audit.jsonl"
    victim = tmp_path / "elsewhere" / "precious"
    victim.parent.mkdir()
    victim.write_bytes(b"not the agent's to truncate\n")
    before = victim.read_bytes()
    log = AuditLog(path, settings=AuditConfig(rotate_bytes=300))
    try:
        log.record(Fields(event="sign", pad="p" * 400))
        nxt = path.with_name(path.name + ".next")
        if plant == "symlink":
            nxt.symlink_to(victim)
        else:
            os.link(victim, nxt)
        log.record(Fields(event="sign", n=2))  # due: rotates
    finally:
        log.close()
    return path, victim, before


def check(tmp_path: Path, path: Path, victim: Path, before: bytes) -> None:
    assert victim.read_bytes() == before
    assert not path.is_symlink() and os.stat(path).st_ino != os.stat(victim).st_ino
    assert [json.loads(x)["event"] for x in path.read_bytes().splitlines()] == ["rotate", "sign"]
    assert verify([tmp_path]).ok


def test_a_symbolic_link_at_the_next_name_is_not_followed(tmp_path: Path) -> None:
    check(tmp_path, *rotate_with_planted(tmp_path, "symlink"))


def test_a_hard_link_at_the_next_name_is_not_truncated(tmp_path: Path) -> None:
    check(tmp_path, *rotate_with_planted(tmp_path, "hardlink"))
