"""``audit verify`` reads a year of rotated files in one go: what it keeps in memory must not grow with the
number of records (it used to keep the hash of every record of the set, ~150 bytes each: gigabytes for a
long-lived log). Measured with tracemalloc on real files of N and 4N records, both with checkpoints (one in
the file, landing a few records after the head it signed, and one given from outside); the verdicts stay
the same."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

from agent.core.audit_verify import verify
from agent.core.chain import GENESIS, line_hash
from agent.core.checkpoint import NoteSigner, parse
from agent.dev.softkeys import SoftKeyStore
from agent.token.keys import KeyKind

ORIGIN = "test.example/dfns-agent/audit"


def write_log(path: Path, records: int, signer: NoteSigner, *, late_by: int) -> str:
    """``records`` sign records; a checkpoint of record ``records // 2`` written ``late_by`` records after
    it, and the note of the last record (returned, as the journal's copy)."""
    prev, seq, heads = GENESIS, 0, {}
    with open(path, "wb") as f:

        def put(fields: dict[str, object]) -> None:
            nonlocal prev, seq
            seq += 1
            line = json.dumps({"seq": seq, **fields, "prev": prev}, separators=(",", ":")).encode()
            prev = heads[seq] = line_hash(line)
            f.write(line + b"\n")

        for i in range(records):
            put({"event": "sign", "i": i})
            if i + 1 == records // 2 + late_by:
                size = records // 2
                put({"event": "checkpoint", "treeSize": size, "checkpoint": signer.sign(size, heads[size])})
    return signer.sign(seq, prev)


def peak_of_verify(tmp_path: Path, records: int, signer: NoteSigner) -> int:
    directory = tmp_path / str(records)
    directory.mkdir()
    journal = write_log(directory / "audit.jsonl", records, signer, late_by=5)
    tracemalloc.start()
    try:
        result = verify([directory], public_key=signer.public_key, external=[parse(journal)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.ok and result.proven == result.last_seq == records + 1, result
    assert all(c.matches for c in result.checkpoints), result.checkpoints
    return peak


def test_verify_keeps_no_per_record_state(tmp_path: Path) -> None:
    store = SoftKeyStore.with_keys([("audit", KeyKind.ED25519)])
    signer = NoteSigner(store, store.find_key("audit"), ORIGIN)
    small = peak_of_verify(tmp_path, 20_000, signer)
    large = peak_of_verify(tmp_path, 80_000, signer)
    assert large < small * 1.5, (small, large)


def test_a_checkpoint_that_lands_long_after_its_head_is_still_compared(tmp_path: Path) -> None:
    store = SoftKeyStore.with_keys([("audit", KeyKind.ED25519)])
    signer = NoteSigner(store, store.find_key("audit"), ORIGIN)
    path = tmp_path / "audit.jsonl"
    write_log(path, 30_000, signer, late_by=14_000)  # far beyond any window of recent records
    result = verify(path, public_key=signer.public_key)
    assert result.ok and result.proven == 15_000, result
    assert [c.matches for c in result.checkpoints] == [True]
    # and a rewrite of that record is caught
    data = path.read_bytes().split(b"\n")
    data[14_999] = data[14_999].replace(b'"i":14999', b'"i":777777')
    path.write_bytes(b"\n".join(data))
    assert not verify(path, public_key=signer.public_key).ok
