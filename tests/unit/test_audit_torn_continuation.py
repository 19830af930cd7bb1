"""A live file that holds nothing but a torn line, next to rotated files: what a crash leaves when it cuts
short the ``rotate`` record an emptied live file starts with (``AuditLog._continue_from_archive``). The
agent must repair it *and* continue the rotated files' chain (seq goes on, ``prev`` is their head), and
``audit verify`` must read it as the torn tail it is, not as a record cut short in the middle of the set.
Real files and real rotations throughout."""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import AuditConfig
from agent.core.audit import AuditLog, line_hash
from agent.core.audit_verify import verify
from tests.unit.test_audit_chain import Fields, lines


def rotated_then_torn(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Rotated files, and a live file an operator moved away whose replacement's first write was cut short."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, settings=AuditConfig(rotate_bytes=300))
    for i in range(6):
        log.record(Fields(event="sign", i=i, pad="p" * 80))
    log.close()
    archives = sorted(tmp_path.glob("audit-*.jsonl"))
    assert archives
    last_seq = lines(path)[-1]["seq"]
    path.unlink()  # moved away by an operator; the agent then died in the middle of the rotate record
    path.write_bytes(b'{"seq":%d,"time":"2026-01-01T00:00:00.000Z","event":"rotate","previousFi' % (last_seq + 1))
    return path, archives


def test_verify_reads_a_live_file_of_one_torn_line_as_a_torn_tail(tmp_path: Path) -> None:
    path, _ = rotated_then_torn(tmp_path)
    result = verify([tmp_path])
    assert result.ok, result
    assert any("not a complete record" in w for w in result.warnings)


def test_a_live_file_of_one_torn_line_is_repaired_and_continues_the_rotated_files(tmp_path: Path) -> None:
    path, _ = rotated_then_torn(tmp_path)
    log = AuditLog(path)
    try:
        log.record(Fields(event="sign", i=6))
    finally:
        log.close()
    archives = sorted(tmp_path.glob("audit-*.jsonl"))
    head = archives[-1].read_bytes().splitlines()[-1]
    records = lines(path)
    assert records[0]["seq"] == json.loads(head)["seq"] + 1, records  # seq goes on, it does not restart at 1
    assert records[0]["prev"] == line_hash(head)
    assert [r["event"] for r in records][-1] == "sign" and "repair" in [r["event"] for r in records]
    whole = verify([tmp_path])
    assert whole.ok and whole.first_seq == 1, whole
    alone = verify([path])  # retention deleted the rotated files: the live file still verifies on its own
    assert alone.ok, alone
