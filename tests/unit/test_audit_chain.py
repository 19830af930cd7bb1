"""The audit log's failure handling, checkpoints, rotation and refusal aggregation, in process (real files,
software keys for the checkpoint signer; the same through running agents on SoftHSM is in
``tests/device/test_audit_drills.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.caller import Caller
from agent.config import AuditConfig
from agent.core.audit import GENESIS, AuditLog, line_hash
from agent.core.audit_verify import verify
from agent.core.checkpoint import NoteSigner, find_in_text, key_id, log_line, note_text, parse
from agent.core.records import AuditRecord, Event, Outcome
from agent.core.refusals import MAX_KEYS, RefusalAggregator
from agent.dev.softkeys import SoftKeyStore
from agent.dev.testing import files_cannot_grow_past, wait_until
from agent.errors import AuditUnavailable
from agent.token.keys import KeyKind

ORIGIN = "test.example/dfns-agent/audit"


class Fields:
    def __init__(self, **fields: object) -> None:
        self.fields = fields

    def to_json(self) -> dict[str, object]:
        return self.fields


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def edit_and_rechain(path: Path) -> None:
    """Record 2's "who" edited (to one as long) and the chain recomputed from it: same length, same inode."""
    records, prev, out = lines(path), GENESIS, []
    records[1]["who"] = "mally"
    for r in records:
        r["prev"] = prev
        raw = json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode()
        prev = line_hash(raw)
        out.append(raw + b"\n")
    path.write_bytes(b"".join(out))


def signer(kind: KeyKind = KeyKind.ED25519, *, fresh: bool = False) -> NoteSigner:
    store = SoftKeyStore.with_keys([("audit", kind)], fresh=fresh)
    return NoteSigner(store, store.find_key("audit"), ORIGIN)


# -- torn and short writes ------------------------------------------------------------------------------


def test_a_write_that_comes_up_short_is_cut_back_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    try:
        log.record(Fields(event="sign", n=1))
        size = path.stat().st_size
        with files_cannot_grow_past(size + 40):  # room for part of a record only: a short write
            with pytest.raises(AuditUnavailable, match="signature withheld"):
                log.record(Fields(event="sign", n=2, pad="x" * 200))
            assert path.stat().st_size == size  # cut back: no partial record left behind
            assert log.probe() is not None  # and health says so
        assert log.probe() is None
        log.record(Fields(event="sign", n=3))
    finally:
        log.close()
    records = lines(path)
    assert [r["n"] for r in records] == [1, 3] and [r["seq"] for r in records] == [1, 2]
    assert verify(path).ok


def test_a_torn_tail_from_a_crash_is_cut_off_and_recorded_never_appended_to(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record(Fields(event="sign", n=1))
    log.record(Fields(event="sign", n=2))
    log.close()
    good = path.read_bytes()
    torn = b'{"seq":3,"time":"2026-01-01T00:00:00.000Z","event":"sign","signature":"abc'
    with open(path, "ab") as f:  # a process died in the middle of its write
        f.write(torn)
    log = AuditLog(path)
    try:
        assert [r["event"] for r in lines(path)] == ["sign", "sign", "repair"]  # repaired at open already
        log.record(Fields(event="sign", n=3))
    finally:
        log.close()
    assert path.read_bytes().startswith(good)
    records = lines(path)
    assert [r["event"] for r in records] == ["sign", "sign", "repair", "sign"]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]  # seq goes on: it does not restart at 1
    assert records[2]["truncatedBytes"] == len(torn) and records[2]["offset"] == len(good)
    assert "not a complete record" in caplog.text
    assert verify(path).ok


def test_a_last_record_that_is_not_a_record_is_refused_not_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":1,"prev":"' + GENESIS.encode() + b'"}\nnot json at all\n')
    before = path.read_bytes()
    log = AuditLog(path)
    try:
        with pytest.raises(AuditUnavailable, match="refusing to append"):
            log.record(Fields(event="sign"))
        assert log.probe() is not None and "refusing to append" in str(log.probe())
    finally:
        log.close()
    assert path.read_bytes() == before


def test_a_failed_fsync_leaves_its_records_so_what_other_workers_read_meanwhile_stays_true(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker syncs after it has released the lock, so another may read its lines before the fsync fails.
    Taking them back out then would leave that reader chained to records that no longer exist (its cached
    tail matches by size once the file regrows). They stay: a record without an answer is harmless."""
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path), AuditLog(path)  # two workers
    real_fsync, failed = os.fsync, []

    def fsync(fd: int) -> None:
        if not failed:
            failed.append(fd)
            assert b.probe() is None  # worker B reads the tail (and caches it) while A's lines are unsynced
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        with pytest.raises(AuditUnavailable, match="signature withheld"):
            a.record(Fields(event="sign", n=1))
        a.record(Fields(event="sign", n=2))  # the same length as the first: the file regrows to the same size
        b.record(Fields(event="sign", n=3))
    finally:
        a.close()
        b.close()
    assert failed
    assert verify(path).ok, verify(path)
    records = lines(path)
    assert [r["n"] for r in records] == [1, 2, 3] and [r["seq"] for r in records] == [1, 2, 3]


def test_seq_goes_on_across_instances_sharing_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path), AuditLog(path)  # two workers
    try:
        for i in range(3):
            a.record(Fields(event="sign", i=i))
            b.record(Fields(event="sign", i=i))
    finally:
        a.close()
        b.close()
    assert [r["seq"] for r in lines(path)] == list(range(1, 7)) and verify(path).ok


# -- checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [KeyKind.ED25519, KeyKind.P256])
def test_checkpoints_are_c2sp_signed_notes_over_the_chain_head(tmp_path: Path, kind: KeyKind) -> None:
    path = tmp_path / "audit.jsonl"
    s = signer(kind)
    log = AuditLog(path, settings=AuditConfig(checkpoint_every=3, checkpoint_interval=0), signer=s)
    try:
        for i in range(6):
            log.record(Fields(event="sign", i=i))
            if i in (2, 4):  # seq 3 and seq 6 cross a multiple of 3: a checkpoint (signed on another thread)
                wait_until(lambda: lines(path)[-1]["event"] == "checkpoint", 10, "a checkpoint")
    finally:
        log.close()  # a last checkpoint at shutdown
    records = lines(path)
    raw = path.read_bytes().splitlines()
    checkpoints = [r for r in records if r["event"] == "checkpoint"]
    assert [r["treeSize"] for r in checkpoints] == [3, 6, 8]  # the last one at shutdown
    for record in checkpoints:
        cp = parse(record["checkpoint"])
        assert cp.origin == ORIGIN and cp.size == record["treeSize"] < record["seq"]
        assert cp.head == line_hash(raw[cp.size - 1])  # the head: the hash of record `size`
        assert cp.text == note_text(ORIGIN, cp.size, cp.head)
        name, blob = cp.signatures[0]
        assert name == ORIGIN and blob[:4] == key_id(ORIGIN, s.public_key)
        assert cp.verify(ORIGIN, s.public_key)
    assert records[-1]["event"] == "checkpoint" and parse(records[-1]["checkpoint"]).size == records[-2]["seq"]
    result = verify(path, public_key=s.public_key)
    assert result.ok and result.proven == records[-2]["seq"]


def test_the_ed25519_note_signature_is_the_signed_note_format() -> None:
    """Recompute the note by hand from the spec: text, blank line, '— name base64(keyID || sig)'."""
    s = signer()
    note = s.sign(5, "ab" * 32)
    text, sig_line = note.split("\n\n")
    assert text + "\n" == f"{ORIGIN}\n5\n" + "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n"
    dash, name, b64 = sig_line.rstrip("\n").split(" ")
    assert dash == "\u2014" and name == ORIGIN
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    blob = base64.b64decode(b64)
    raw = s.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert blob[:4] == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + raw).digest()[:4]
    assert isinstance(s.public_key, ed25519.Ed25519PublicKey)
    s.public_key.verify(blob[4:], (text + "\n").encode())


def write_signed(path: Path, s: NoteSigner, n: int, every: int = 4) -> list[str]:
    """``n`` records with checkpoints; returns the checkpoint log lines (the journal's copies)."""
    log = AuditLog(path, settings=AuditConfig(checkpoint_every=0, checkpoint_interval=0), signer=s)
    try:
        for i in range(n):
            log.record(Fields(event="sign", i=i))
            if (i + 1) % every == 0:
                assert log.checkpoint()
    finally:
        log.close()
    return [log_line(r["checkpoint"]) for r in lines(path) if r["event"] == "checkpoint"]


def test_verify_detects_truncation_edits_and_rewrites_up_to_the_last_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    s = signer()
    journal = "\n".join(f"Dec 02 08:00:00 host dfns-agent[1]: {line}" for line in write_signed(path, s, 10))
    external = list(find_in_text(journal))
    assert external and max(c.size for c in external) == 12  # 10 records and 2 checkpoints before the last
    original = path.read_bytes()
    key = s.public_key
    assert verify(path, public_key=key, external=external).ok

    # Truncation: the last records (and the checkpoints among them) cut off. The chain is intact...
    kept = original.splitlines(keepends=True)[:7]
    path.write_bytes(b"".join(kept))
    assert verify(path).ok
    # ...but a checkpoint from the journal says there were more.
    cut = verify(path, public_key=key, external=external)
    assert not cut.ok and "truncation" in str(cut.reason)

    # An edit of the last record before a checkpoint, with the chain recomputed from it: a rewrite.
    records = [json.loads(line) for line in original.splitlines()]
    records[2]["i"] = 99
    rewritten, prev = [], GENESIS
    for r in records:
        if r["event"] == "checkpoint":
            continue  # a rewriter cannot sign new ones: drop them
        r["prev"], r["seq"] = prev, len(rewritten) + 1
        line = json.dumps(r, separators=(",", ":")).encode()
        prev = line_hash(line)
        rewritten.append(line + b"\n")
    path.write_bytes(b"".join(rewritten))
    alone = verify(path, public_key=key)
    assert alone.ok and alone.proven == 0  # the file alone cannot show it ...
    assert any("not proven" in line for line in alone.summary())
    caught = verify(path, public_key=key, external=external)  # ... the journal's checkpoints can
    assert not caught.ok and "not the one it signed" in str(caught.reason)

    # A forged checkpoint (another key) in the file fails the signature check.
    path.write_bytes(original)
    forged = write_signed(tmp_path / "other.jsonl", signer(fresh=True), 4)
    bad = verify(path, public_key=key, external=list(find_in_text("\n".join(forged))))
    assert not bad.ok and "does not verify" in str(bad.reason)


def test_verify_says_what_it_cannot_prove_after_the_last_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    s = signer()
    write_signed(path, s, 4, every=100)  # one checkpoint, at shutdown, over records 1..4
    log = AuditLog(path)  # then records without a signer
    log.record(Fields(event="sign"))
    log.close()
    result = verify(path, public_key=s.public_key)
    text = "\n".join(result.summary())
    assert result.ok and result.proven == 4 and result.last_seq == 6
    assert "proven: records 1..4" in text and "not proven: records 5..6" in text and "truncation" in text


# -- rotation ------------------------------------------------------------------------------------------------


def test_rotation_continues_the_chain_and_verify_takes_the_whole_set(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    s = signer()
    settings = AuditConfig(rotate_bytes=600, checkpoint_every=0, checkpoint_interval=0)
    log = AuditLog(path, settings=settings, signer=s)
    other = AuditLog(path, settings=settings, signer=s)  # a second worker, following the rotations
    try:
        for i in range(20):
            (log if i % 2 else other).record(Fields(event="sign", i=i, pad="p" * 80))
    finally:
        log.close()
        other.close()
    archives = sorted(tmp_path.glob("audit-*.jsonl"))
    assert len(archives) >= 2
    for archive in archives:  # each rotated file ends with a checkpoint of its own head
        last = lines(archive)[-1]
        assert last["event"] == "checkpoint" and parse(last["checkpoint"]).size == last["seq"] - 1
    first = lines(path)[0]
    assert first["event"] == "rotate" and first["previousFile"] == archives[-1].name
    assert first["prev"] == line_hash(archives[-1].read_bytes().splitlines()[-1])
    whole = verify([tmp_path], public_key=s.public_key)
    assert whole.ok and whole.first_seq == 1 and len(whole.files) == len(archives) + 1
    assert sum(1 for r in lines(path) + [x for a in archives for x in lines(a)] if r["event"] == "sign") == 20
    # A file taken out of the middle breaks the chain.
    aside = archives[1].with_name("aside")
    archives[1].rename(aside)
    gap = verify([tmp_path])
    assert not gap.ok and "prev does not match" in str(gap.reason)
    aside.rename(archives[1])
    # Retention: dropping the oldest file leaves a set that starts later but still verifies, anchored by the
    # checkpoint at the end of the file it kept.
    archives[0].unlink()
    rest = verify([tmp_path], public_key=s.public_key)
    assert rest.ok and rest.first_seq > 1 and rest.proven > rest.first_seq
    assert any("earlier files are not in it" in line for line in rest.summary())


def test_an_emptied_live_file_continues_the_newest_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, settings=AuditConfig(rotate_bytes=300))
    for i in range(6):
        log.record(Fields(event="sign", i=i, pad="p" * 80))
    log.close()
    path.unlink()  # an operator moved the live file away
    log = AuditLog(path)
    log.record(Fields(event="sign", i=6))
    log.close()
    archives = sorted(tmp_path.glob("audit-*.jsonl"))
    first, second = lines(path)
    assert first["event"] == "rotate" and first["previousFile"] == archives[-1].name
    assert first["seq"] == first["previousSeq"] + 1 == lines(archives[-1])[-1]["seq"] + 1
    assert second["i"] == 6 and verify([tmp_path]).ok
    for archive in archives:  # retention deleted every rotated file: the live file still verifies alone
        archive.unlink()
    alone = verify([tmp_path])
    assert alone.ok and alone.first_seq == first["seq"], alone


# -- refusals --------------------------------------------------------------------------------------------------


def refusal(pid: int = 10, reason: str = "uid 65534 may not use this agent") -> AuditRecord:
    return AuditRecord(
        Event.REFUSED,
        Caller(65534, 65534, pid, "/usr/bin/python3"),
        endpoint="/v1/health",
        outcome=Outcome.REFUSED,
        code="forbidden",
        reason=reason,
    )


def test_refusals_are_aggregated_per_caller_and_reason_per_interval() -> None:
    now = [0.0]
    agg = RefusalAggregator(60.0, clock=lambda: now[0], now=lambda: f"t{now[0]:g}")
    assert agg.admit(refusal()) is True  # the first is written at once
    assert [agg.admit(refusal()) for _ in range(1000)] == [False] * 1000
    assert agg.admit(refusal(pid=11)) is True  # another caller
    assert agg.admit(refusal(reason="another reason")) is True
    assert agg.due() == []  # the interval has not ended
    now[0] = 61.0
    summaries = agg.due()
    assert [(s.caller.pid if s.caller else None, s.count) for s in summaries] == [(10, 1000)]
    assert summaries[0].first_time == "t0" and summaries[0].last_time == "t0"
    assert agg.admit(refusal()) is True  # a new interval
    assert agg.next_deadline() == 60.0


def test_the_refusal_table_is_bounded() -> None:
    agg = RefusalAggregator(60.0, clock=lambda: 0.0, now=lambda: "t")
    written = sum(agg.admit(refusal(pid=p)) for p in range(10 * MAX_KEYS))
    assert written == MAX_KEYS + 1  # beyond the bound, one overflow bucket per uid and code
    overflow = [s for s in agg.due(everything=True) if s.reason and "more callers and reasons" in s.reason]
    assert len(overflow) == 1 and overflow[0].count == 10 * MAX_KEYS - MAX_KEYS - 1
    assert overflow[0].caller is not None and overflow[0].caller.uid == 65534  # whose refusals they were


def test_a_refusal_flood_writes_two_records_and_a_count(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, settings=replace(AuditConfig(), refusal_interval=3600.0))

    async def flood() -> list[bool]:
        return [await log.refusal(refusal()) for _ in range(5000)]

    try:
        firsts = asyncio.run(flood())
        assert firsts == [True] + [False] * 4999  # only the first is worth a log line too
        assert len(lines(path)) == 1
    finally:
        log.close()
    records = lines(path)
    assert len(records) == 2 and records[1]["count"] == 4999 and verify(path).ok
    assert os.path.getsize(path) < 2000


@pytest.mark.parametrize("change", ["edit", "truncate"])
def test_the_agent_never_signs_a_checkpoint_over_a_history_it_checkpointed_differently(
    tmp_path: Path, change: str
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, settings=AuditConfig(checkpoint_every=0, checkpoint_interval=0), signer=signer())
    try:
        for i in range(3):
            log.record(Fields(event="sign", who="alice", i=i))
        assert log.checkpoint()
        log.record(Fields(event="sign", who="alice", i=3))
        data = path.read_bytes()
        if change == "edit":
            edit_and_rechain(path)
        else:
            path.write_bytes(b"".join(data.splitlines(keepends=True)[:2]))
        log.record(Fields(event="sign", i=4))  # records go on (the chain continues whatever the file ends in)
        assert not log.checkpoint()
        problem = log.probe()
        assert problem is not None and "no checkpoint signed over it" in problem
        assert ("edited or rewritten" if change == "edit" else "cut off") in problem
    finally:
        log.close()
    assert sum(1 for r in lines(path) if r["event"] == "checkpoint") == (1 if change == "edit" else 0)


# -- configuration -------------------------------------------------------------------------------------------


def test_the_checkpoint_key_must_be_a_dedicated_ed25519_or_p256_key_on_the_token() -> None:
    from agent.core.checkpoint import signer_for
    from agent.errors import ConfigError, KeyNotFound, UnsupportedKey

    store = SoftKeyStore.with_keys([("audit", KeyKind.ED25519), ("cred", KeyKind.P256), ("rsa", KeyKind.RSA2048)])
    assert signer_for(AuditConfig(), store, ["cred"]) is None  # no key: no checkpoints
    made = signer_for(AuditConfig(checkpoint_key="audit", checkpoint_origin=ORIGIN), store, ["cred"])
    assert made is not None and made.origin == ORIGIN
    default = signer_for(AuditConfig(checkpoint_key="audit"), store, [])
    assert default is not None and default.origin.endswith("/dfns-agent/audit")
    with pytest.raises(ConfigError, match="credential's key"):
        signer_for(AuditConfig(checkpoint_key="cred"), store, ["cred"])
    with pytest.raises(UnsupportedKey, match="Ed25519 or P-256"):
        signer_for(AuditConfig(checkpoint_key="rsa"), store, [])
    with pytest.raises(KeyNotFound):
        signer_for(AuditConfig(checkpoint_key="nowhere"), store, [])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("checkpoint_every = -1", "'checkpoint_every' must be a whole number >= 0"),
        ("checkpoint_every = 1.5", "'checkpoint_every' must be a whole number >= 0"),
        ('rotate_bytes = "big"', "'rotate_bytes' must be a whole number >= 0"),
        ("refusal_interval = 0", "'refusal_interval' must be > 0"),
        ('checkpoint_origin = "has space"', "'checkpoint_origin' must be non-empty, without spaces or '+'"),
        ("checkpoint_intervall = 5", "checkpoint_intervall"),
    ],
)
def test_audit_settings_are_checked(tmp_path: Path, text: str, error: str) -> None:
    from agent.config import load_config
    from agent.errors import ConfigError

    config = tmp_path / "agent.toml"
    config.write_text(f'[token]\nmodule = "/usr/lib/x.so"\nlabel = "t"\n[audit]\n{text}\n')
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(config)


def test_audit_settings_are_read(tmp_path: Path) -> None:
    from agent.config import load_config

    config = tmp_path / "agent.toml"
    config.write_text(
        '[token]\nmodule = "/usr/lib/x.so"\nlabel = "t"\n[audit]\ncheckpoint_key = "dfns-audit"\n'
        'checkpoint_origin = "h.example/log"\ncheckpoint_every = 10\ncheckpoint_interval = 5\n'
        "rotate_bytes = 1000\nrotate_age = 86400\nrefusal_interval = 30\n"
    )
    a = load_config(config).audit
    assert (a.checkpoint_key, a.checkpoint_origin, a.checkpoint_every, a.checkpoint_interval) == (
        "dfns-audit", "h.example/log", 10, 5.0,
    )  # fmt: skip
    assert (a.rotate_bytes, a.rotate_age, a.refusal_interval) == (1000, 86400.0, 30.0)


def test_a_checkpoint_that_landed_after_newer_records_does_not_stand_for_the_last_one(tmp_path: Path) -> None:
    """Checkpoints are signed off the writer thread: a record may land between signing and appending. The one
    at shutdown must still cover every record."""
    from agent.core.audit import _Pending
    from agent.core.chain import read_tail

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, settings=AuditConfig(checkpoint_every=0, checkpoint_interval=0), signer=signer())
    log.record(Fields(event="sign", i=1))
    with open(path, "rb") as f:
        signed_early = log._checkpoint_fields(read_tail(f.fileno()))  # signed over record 1 ...
    log.record(Fields(event="sign", i=2))  # ... record 2 lands ...
    log._write([_Pending(signed_early)], finish=False)  # ... then the checkpoint (seq 3, covering 1)
    log.close()
    records = lines(path)
    assert [(r["event"], r.get("treeSize")) for r in records] == [
        ("sign", None), ("sign", None), ("checkpoint", 1), ("checkpoint", 3),
    ]  # fmt: skip
    assert verify(path, public_key=signer().public_key).proven == 3


# -- sets that start mid-chain -------------------------------------------------------------------------------


def rotated_set(directory: Path, s: NoteSigner) -> list[Path]:
    """A rotated log (each archive ends with a checkpoint of its head); returns the archives, oldest first."""
    settings = AuditConfig(rotate_bytes=600, checkpoint_every=0, checkpoint_interval=0)
    log = AuditLog(directory / "audit.jsonl", settings=settings, signer=s)
    try:
        for i in range(20):
            log.record(Fields(event="sign", i=i, pad="p" * 80))
    finally:
        log.close()
    archives = sorted(directory.glob("audit-*.jsonl"))
    assert len(archives) >= 3
    return archives


def test_records_cut_from_the_front_of_a_checkpointed_file_are_not_reported_as_proven(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    s = signer()
    journal = list(find_in_text("\n".join(write_signed(path, s, 5, every=100))))  # a checkpoint over 1..5
    assert verify(path, public_key=s.public_key).proven == 5
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[2:]))  # records 1-2 deleted
    for external in ([], journal):
        result = verify(path, public_key=s.public_key, external=external)
        text = "\n".join(result.summary())
        assert not result.ok and result.first_bad_line == 1, text
        assert "cut from the front" in text and "starts at seq 3" in text
        assert "proven: records 1..5" not in text and "none of them was" not in text


def test_records_cut_from_the_front_of_the_first_remaining_archive_are_caught(tmp_path: Path) -> None:
    s = signer()
    archives = rotated_set(tmp_path, s)
    archives[0].unlink()  # retention
    kept = archives[1].read_bytes().splitlines(keepends=True)
    assert json.loads(kept[0])["event"] == "rotate"
    archives[1].write_bytes(b"".join(kept[2:]))  # its rotate record and the record after it deleted
    result = verify([tmp_path], public_key=s.public_key)
    text = "\n".join(result.summary())
    assert not result.ok and result.bad_file == archives[1] and result.first_bad_line == 1, text
    assert "cut from the front" in text and "none of them was" not in text


def test_a_set_after_retention_proves_only_what_it_holds_and_says_where_it_starts(tmp_path: Path) -> None:
    s = signer()
    archives = rotated_set(tmp_path, s)
    for archive in archives[:2]:
        archive.unlink()  # retention: the oldest files deleted whole
    first = lines(archives[2])[0]
    rest = verify([tmp_path], public_key=s.public_key)
    text = "\n".join(rest.summary())
    assert rest.ok and rest.first_seq == first["seq"] > 1 and rest.proven > rest.first_seq, text
    assert f"proven: records {rest.first_seq}..{rest.proven} " in text and "proven: records 1.." not in text
    assert f"the set starts at seq {rest.first_seq}" in text and first["previousFile"] in text
    assert "earlier files are not in it" in text
    # Without the key nothing is proven, and what is not proven starts where the set does.
    unkeyed = "\n".join(verify([tmp_path]).summary())
    assert f"not proven: records {rest.first_seq}..{rest.last_seq} " in unkeyed
    # The live file alone is a set that starts mid-chain too: it starts with a rotate record.
    live = verify(tmp_path / "audit.jsonl", public_key=s.public_key)
    assert live.ok and live.first_seq == lines(tmp_path / "audit.jsonl")[0]["seq"]
    assert "proven: records 1.." not in "\n".join(live.summary())


def test_a_checkpoint_of_the_record_just_before_the_set_proves_none_of_its_records(tmp_path: Path) -> None:
    """The first record's ``prev`` matching a signed head shows the set continues that chain, but anyone can
    write a record with that ``prev``: no record of the set is proven by it."""
    s = signer()
    archives = rotated_set(tmp_path, s)
    live = tmp_path / "audit.jsonl"
    first = lines(live)[0]
    before = parse(lines(archives[-1])[-1]["checkpoint"])  # the archive's own checkpoint, of its last record
    assert before.size == first["seq"] - 2
    for archive in archives:
        archive.unlink()
    kept = [line for line in live.read_bytes().splitlines(keepends=True) if b'"event":"checkpoint"' not in line]
    live.write_bytes(b"".join(kept))  # the live file's own checkpoint (at shutdown, at its end) taken out
    assert verify(live).ok
    cp = parse(s.sign(first["seq"] - 1, first["prev"]))  # a signed head: the archive's checkpoint record
    result = verify(live, public_key=s.public_key, external=[cp])
    assert result.ok and result.proven == 0 and result.checkpoints[-1].matches is True
    assert "proven: records" not in "\n".join(result.summary()).replace("not proven: records", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another uid needs root (CI runs as root)")
def test_health_says_so_when_a_due_rotation_cannot_make_its_files() -> None:
    """The live file is writable but its directory is not: every append from the moment a rotation is due
    fails (no record, no signature), and the probe behind /v1/health must say so instead of "ok"."""
    base = Path(tempfile.mkdtemp(prefix="da-rotate-"))  # reachable by uid 65534 (pytest's tmp_path is not)
    try:
        _probe_as_nobody(base)
    finally:
        shutil.rmtree(base)


def _probe_as_nobody(base: Path) -> None:
    os.chmod(base, 0o755)
    path = base / "audit.jsonl"
    path.touch(mode=0o600)
    os.chown(path, 65534, 65534)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # as uid 65534, who owns the file and not its directory
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            log = AuditLog(path, settings=AuditConfig(rotate_bytes=300, checkpoint_every=0))
            seen = {"before": log.probe()}
            failed = 0
            for i in range(20):
                try:
                    log.record(Fields(event="sign", i=i))
                except AuditUnavailable:
                    failed += 1
            seen |= {"failed": failed, "after": log.probe()}
            log.close()
            os.write(write, json.dumps(seen).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as r:
        seen = json.loads(r.read() or b"{}")
    assert os.waitpid(pid, 0)[1] == 0 and seen, seen
    assert seen["before"] is None and seen["failed"] > 0, seen
    assert seen["after"] is not None and "cannot rotate audit log" in seen["after"], seen
