"""The checkpoint a rotation signs before it closes a file is a checkpoint like any other: the agent must
not sign one over a file that no longer holds the head it checkpointed before (records cut off, or edited
with the chain recomputed), nor sign anything once it found such a file (README: "it logs an error, signs
nothing more and health says down"). Real files, a software checkpoint key, a real rotation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import AuditConfig
from agent.core.audit import AuditLog
from tests.unit.test_audit_chain import Fields, edit_and_rechain, lines, signer


def tamper(path: Path, change: str) -> None:
    if change == "edit":
        edit_and_rechain(path)
    else:
        path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:2]))


@pytest.mark.parametrize("change", ["edit", "cut"])
@pytest.mark.parametrize("noticed", [False, True], ids=["at-rotation", "noticed-before"])
def test_a_rotation_signs_no_checkpoint_over_a_history_it_checkpointed_differently(
    tmp_path: Path, change: str, noticed: bool
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, settings=AuditConfig(checkpoint_every=0, checkpoint_interval=0), signer=signer())
    try:
        for i in range(3):
            log.record(Fields(event="sign", who="alice", i=i))
        assert log.checkpoint()
        log.record(Fields(event="sign", who="alice", i=3))
        tamper(path, change)
        if noticed:  # a timed checkpoint found it first
            assert not log.checkpoint() and log.tampered is not None
        log.settings = replace(log.settings, rotate_bytes=1)  # the next record rotates
        log.record(Fields(event="sign", i=4))
        problem = log.probe()
        assert problem is not None and "no checkpoint signed over it" in problem
    finally:
        log.close()
    archives = sorted(tmp_path.glob("audit-*.jsonl"))
    assert len(archives) == 1  # it did rotate
    checkpoints = [r for r in lines(archives[0]) + lines(path) if r["event"] == "checkpoint"]
    assert len(checkpoints) == (1 if change == "edit" else 0), checkpoints  # only the one before the change
