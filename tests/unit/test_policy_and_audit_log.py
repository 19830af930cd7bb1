"""Policy decisions and the audit log in process: pure logic, no sockets, no token (the same features
through a running agent are in ``tests/device/test_policy_audit.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from agent.caller import Caller
from agent.config import Rule
from agent.core.audit import GENESIS, AuditLog, verify
from agent.core.policy import Policy
from agent.errors import Forbidden, RateLimited


class Fields:
    """Any record the log may be handed (the agent hands it ``AuditRecord``s): these tests probe the log itself."""

    def __init__(self, **fields: object) -> None:
        self.fields = fields

    def to_json(self) -> dict[str, object]:
        return self.fields


def test_policy_default_admits_own_uid_and_root_only() -> None:
    policy = Policy(own_uid=1000)
    assert policy.check(Caller(1000, 1000, 1, None), "sign").rule is None
    assert policy.check(Caller(0, 0, 1, None), "sign").rule is None
    with pytest.raises(Forbidden, match="uid 1001 may not use this agent"):
        policy.check(Caller(1001, 1001, 1, None), "sign")


def test_policy_first_matching_rule_applies_and_all_selectors_must_match() -> None:
    rules = [
        Rule(name="py-in-group", gids=frozenset({50}), exes=("/usr/bin/python3",), credentials=frozenset({"a"})),
        Rule(name="group", gids=frozenset({50}), credentials=frozenset({"b"})),
    ]
    policy = Policy(rules=rules, own_uid=1000)
    python = Caller(2000, 50, 1, "/usr/bin/python3")
    other = Caller(2000, 50, 1, "/usr/bin/perl")
    assert policy.check(python, "sign").credentials == {"a"}
    assert policy.check(other, "sign").credentials == {"b"}
    with pytest.raises(Forbidden, match="rule 'group' does not allow credential 'a'"):
        policy.check(other, "sign", credential="a")


def test_policy_method_path_and_sign_restrictions() -> None:
    rule = Rule(name="payments", uids=frozenset({7}), methods=frozenset({"POST"}), paths=("/wallets/*/transfers",))
    policy = Policy(rules=[rule], own_uid=1000)
    caller = Caller(7, 7, 1, None)
    policy.check(caller, "dfns", method="post", path="/wallets/wa-1/transfers?x=1")
    with pytest.raises(Forbidden, match="does not allow method DELETE"):
        policy.check(caller, "dfns", method="DELETE", path="/wallets/wa-1/transfers")
    with pytest.raises(Forbidden, match="does not allow path /wallets"):
        policy.check(caller, "dfns", method="POST", path="/wallets")
    with pytest.raises(Forbidden, match="does not allow /v1/sign"):
        policy.check(caller, "sign")
    with pytest.raises(Forbidden, match="registering"):
        policy.check(caller, "register")
    opened = Policy(rules=[Rule(name="p", uids=frozenset({7}), paths=("/x",), allow_sign=True)], own_uid=1000)
    opened.check(caller, "sign")


def test_policy_rate_limit_is_a_token_bucket_per_rule_and_uid() -> None:
    now = [100.0]
    rule = Rule(name="slow", uids=frozenset({7, 8}), rate=2.0, burst=3)
    policy = Policy(rules=[rule], own_uid=1000, clock=lambda: now[0])
    seven, eight = Caller(7, 7, 1, None), Caller(8, 8, 1, None)
    for _ in range(3):
        policy.check(seven, "sign")
    with pytest.raises(RateLimited, match="rule 'slow' allows 2 requests/s"):
        policy.check(seven, "sign")
    policy.check(eight, "sign")  # another uid has its own bucket
    now[0] += 0.5  # one token back at 2/s
    policy.check(seven, "sign")
    with pytest.raises(RateLimited):
        policy.check(seven, "sign")


def test_a_record_that_cannot_be_encoded_fails_closed(tmp_path: Path) -> None:
    """Not only I/O errors: anything that stops a record from being written withholds the signature."""
    from agent.errors import AuditUnavailable

    log = AuditLog(tmp_path / "audit.jsonl")
    try:
        circular: dict[str, object] = {}
        circular["self"] = circular
        with pytest.raises(AuditUnavailable, match="signature withheld"):
            log.record(Fields(event="sign", data=circular))
        log.record(Fields(event="sign", data="fine"))  # the log recovers for the next record
        assert log.healthy and verify(tmp_path / "audit.jsonl").records == 1
    finally:
        log.close()


def test_text_utf8_cannot_hold_is_written_as_an_escape_and_the_chain_holds(tmp_path: Path) -> None:
    """A caller's text may carry a lone surrogate (a credential name, say), which UTF-8 cannot encode: the
    record is written as ASCII JSON with the escape (not refused: the signature would be withheld for it),
    and an integer beyond 64 bits stays exact."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    try:
        log.record(Fields(event="refused", credential="bad\ud800name", count=2**70))
    finally:
        log.close()
    raw = path.read_bytes().splitlines()[0]
    assert raw.isascii() and b"\\ud800" in raw
    assert json.loads(raw)["credential"] == "bad\ud800name" and json.loads(raw)["count"] == 2**70
    assert verify(path).ok


def test_a_failed_group_commit_off_the_loop_withholds_every_signature_of_the_batch(tmp_path: Path) -> None:
    """Several records awaited at once are written on the audit log's writer thread; if that write fails,
    all of them fail."""
    from agent.errors import AuditUnavailable

    path = tmp_path / "audit.jsonl"

    async def batch() -> list[BaseException | None]:
        log = AuditLog(path, flush_on_loop=True)
        try:
            read_only = os.open(path, os.O_RDONLY)
            os.close(log._fd)
            log._fd = read_only  # the next write fails with EBADF, as a yanked disk would fail it
            records = (log.record_async(Fields(event="sign", i=i)) for i in range(4))
            return await asyncio.gather(*records, return_exceptions=True)
        finally:
            log.close()

    results = asyncio.run(batch())
    assert all(isinstance(r, AuditUnavailable) and "signature withheld" in str(r) for r in results), results
    assert path.read_bytes() == b""


def test_audit_lines_have_one_format_on_the_thread_and_the_event_loop_path(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    odd = {"who": "zoë ✓", "path": tmp_path, "n": 1.5, "none": None, "nested": {"a": [1, "b"]}}
    log = AuditLog(path)
    log.record(Fields(event="thread", **odd))
    log.close()

    async def on_loop() -> None:
        loop_log = AuditLog(path, flush_on_loop=True)  # continues the chain another instance wrote
        try:
            await asyncio.gather(*(loop_log.record_async(Fields(event="loop", i=i, **odd)) for i in range(5)))
        finally:
            loop_log.close()

    asyncio.run(on_loop())
    lines = path.read_bytes().splitlines()
    assert len(lines) == 6 and verify(path).ok
    prev = GENESIS
    for seq, raw in enumerate(lines, start=1):
        record = json.loads(raw)
        # Compact, UTF-8 (not \u escapes), str() for what JSON cannot hold, keys in write order.
        expected = {"seq": seq, "time": record["time"], "event": record["event"]}
        expected.update({"i": seq - 2} if seq > 1 else {})
        expected.update({**odd, "path": str(tmp_path), "prev": prev})
        assert raw == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
        prev = hashlib.sha256(raw).hexdigest()
