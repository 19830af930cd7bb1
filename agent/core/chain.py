"""The hash chain of the audit log: how a record line is hashed and how the end of a file is read.

Each record line carries ``prev``, the SHA-256 of the previous line's bytes (:data:`GENESIS` for the very
first record), and ``seq``, its number in the whole chain (it goes on across restarts and rotated files).
This is a hash *chain*, not a Merkle tree: a checkpoint's "root hash" is the hash of the last record it
covers (see ``agent/core/checkpoint.py``), and proving one record means reading every record before it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

GENESIS = "0" * 64


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class CorruptTail(ValueError):
    """The last complete line of the file is not a record the chain can continue from."""


@dataclass(frozen=True)
class Tail:
    """Where a file's chain ends: the hash and seq of its last complete record, that record's event, the
    offset just after it (``end``) and the file's size. ``size > end`` means a torn tail: bytes after the
    last newline that are not a whole record (a short write, or a crash in the middle of one)."""

    prev: str
    seq: int
    event: str | None
    end: int
    size: int
    covers: int | None = None  # for a checkpoint record: the tree size it signed

    @property
    def checkpointed(self) -> bool:
        """The last record is a checkpoint of everything before it: a new one would add nothing."""
        return self.event == "checkpoint" and self.covers == self.seq - 1

    @property
    def torn(self) -> bool:
        return self.size > self.end


def read_tail(fd: int, size: int | None = None) -> Tail:
    """The end of the chain in ``fd`` (read with ``pread``; the caller holds the lock)."""
    if size is None:
        size = os.fstat(fd).st_size
    if size == 0:
        return Tail(GENESIS, 0, None, 0, 0)
    window = 4096  # a few records; grows for a very long last line
    while True:
        start = max(0, size - window)
        data = os.pread(fd, size - start, start)
        cut = data.rfind(b"\n")  # the end of the last complete line
        before = data.rfind(b"\n", 0, cut) if cut > 0 else -1
        if start == 0 or before >= 0:
            break
        window *= 8  # one very long line: read further back
    if cut < 0:  # not even one complete line: all of it is torn
        return Tail(GENESIS, 0, None, 0, size)
    end = start + cut + 1
    line = data[before + 1 : cut]
    if not line.strip():
        raise CorruptTail(f"an empty line at offset {end - 1}")
    try:
        record = json.loads(line)
        seq = record["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CorruptTail(f"the last record (ending at offset {end}) is not a JSON record with a seq") from None
    event = record.get("event")
    covers = record.get("treeSize")
    return Tail(
        line_hash(line),
        seq,
        event if isinstance(event, str) else None,
        end,
        size,
        covers if isinstance(covers, int) and not isinstance(covers, bool) else None,
    )


def line_ending_at(fd: int, end: int) -> bytes | None:
    """The complete line whose newline is the byte before ``end``, or None if there is no such line."""
    if end <= 0 or os.pread(fd, 1, end - 1) != b"\n":
        return None
    window = 4096
    while True:
        start = max(0, end - 1 - window)
        data = os.pread(fd, end - 1 - start, start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[cut + 1 :]
        if start == 0:
            return data
        window *= 8
