"""``seq`` is a JSON integer. ``audit verify`` must not take ``true`` for 1 or ``2.0`` for 2 (Python's
``True == 1``, ``2.0 == 2``): the agent itself refuses to continue a file whose last record has such a seq
(``agent/core/chain.py``), so a verifier that accepts it says "ok" of a log the agent calls corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.core.audit import AuditLog
from agent.core.audit_verify import verify
from agent.core.chain import GENESIS, line_hash
from agent.errors import AuditUnavailable
from tests.unit.test_audit_chain import Fields


def chained(*seqs: object) -> bytes:
    out, prev = [], GENESIS
    for seq in seqs:
        line = json.dumps({"seq": seq, "event": "sign", "prev": prev}, separators=(",", ":")).encode()
        out.append(line)
        prev = line_hash(line)
    return b"\n".join(out) + b"\n"


@pytest.mark.parametrize("seqs", [(True,), (1, 2.0), (1, True)], ids=["true-for-1", "float-2", "true-for-2"])
def test_a_seq_that_is_not_an_integer_breaks_the_chain(tmp_path: Path, seqs: tuple[object, ...]) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(chained(*seqs))
    result = verify(path)
    assert not result.ok and "seq" in str(result.reason), result


def test_what_the_agent_refuses_to_continue_verify_does_not_call_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(chained(1, 2.0))
    log = AuditLog(path)
    try:
        with pytest.raises(AuditUnavailable, match="refusing to append"):
            log.record(Fields(event="sign"))
    finally:
        log.close()
    assert not verify(path).ok
