"""Token buckets for the policy's rate limits, shared by every worker process of one agent.

A rule's ``rate`` is the agent's promise, not each worker's: with N workers, per-process buckets would
admit N times the rate. The buckets therefore live in one anonymous shared mapping made when this module
is first imported, which happens in the supervisor before it forks any worker (``agent.daemon.worker``
imports it), so every worker, restarted ones included, sees the same memory. A POSIX record lock on the
mapping's memfd orders the updates across processes (the kernel drops it when its holder dies, so a
worker killed mid-update cannot wedge the others; a semaphore would stay taken), a thread lock within
one. ``time.monotonic`` is the system-wide ``CLOCK_MONOTONIC``: a stamp one worker writes means the same
in another.

The table has a fixed number of slots (a bucket per rule and uid): when a probe finds none free it
reuses the one idle longest, which by then has usually refilled (so forgetting it changes nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from typing import Protocol

_SLOT = struct.Struct("Qdd")  # key (0: free), tokens, stamp
_SLOTS = 4096
_PROBE = 32


def _key(rule: str, uid: int) -> int:
    digest = hashlib.blake2b(f"{rule}\0{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class Buckets(Protocol):
    def take(self, rule: str, uid: int, rate: float, burst: float, now: float) -> bool:
        """Refill the (rule, uid) bucket up to ``now`` and take one token; False when there is none."""


def _refill_and_take(tokens: float, stamp: float, rate: float, burst: float, now: float) -> tuple[bool, float]:
    tokens = min(burst, tokens + max(0.0, now - stamp) * rate)
    if tokens < 1.0:
        return False, tokens
    return True, tokens - 1.0


class LocalBuckets:
    """This process's own buckets (a Policy made outside the agent's workers, e.g. in tests)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, int], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, rule: str, uid: int, rate: float, burst: float, now: float) -> bool:
        with self._lock:
            tokens, stamp = self._buckets.get((rule, uid), (burst, now))
            ok, tokens = _refill_and_take(tokens, stamp, rate, burst, now)
            self._buckets[(rule, uid)] = (tokens, now)
            return ok


class SharedBuckets:
    """Buckets in memory shared with every process forked after this object was made."""

    def __init__(self, slots: int = _SLOTS) -> None:
        self._slots = slots
        self._fd = os.memfd_create("dfns-agent-rate-limits", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, slots * _SLOT.size)
        self._map = mmap.mmap(self._fd, slots * _SLOT.size, flags=mmap.MAP_SHARED)
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def take(self, rule: str, uid: int, rate: float, burst: float, now: float) -> bool:
        key = _key(rule, uid)
        with self._locked():
            offset = self._slot(key)
            stored, tokens, stamp = _SLOT.unpack_from(self._map, offset)
            if stored != key:  # a new bucket (or one that takes over an idle slot) starts full
                tokens, stamp = burst, now
            ok, tokens = _refill_and_take(tokens, stamp, rate, burst, now)
            _SLOT.pack_into(self._map, offset, key, tokens, now)
            return ok

    def _slot(self, key: int) -> int:
        oldest, oldest_stamp = 0, float("inf")
        for i in range(_PROBE):
            offset = ((key + i) % self._slots) * _SLOT.size
            stored, _, stamp = _SLOT.unpack_from(self._map, offset)
            if stored in (key, 0):
                return offset
            if stamp < oldest_stamp:
                oldest, oldest_stamp = offset, stamp
        return oldest


SHARED = SharedBuckets()  # made at import: in the supervisor, before the workers are forked
