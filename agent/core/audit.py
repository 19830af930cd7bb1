"""A tamper-evident audit log: one JSON line per signing or refusal.

Each record carries ``prev``, the SHA-256 of the previous line's bytes (64 zeros for the first), so
changing, inserting or deleting a line breaks the chain at the next one; ``dfns-agent audit verify``
finds the first broken record. Records hold what was signed and for whom (caller, credential, key
fingerprint, SHA-256 of clientData, the challenge, method/path/payload digest) and never a PIN or a token.

A record is on disk (``fsync``) before the signature it describes is returned; if it cannot be written
the agent refuses to sign (fail closed). Concurrent records share one ``fsync`` (group commit): a writer
thread takes everything queued, appends it, syncs once, then releases every waiting caller (threads
through an event, the server's event loop through a future). Several worker processes may append to the
same file: each batch is appended under an exclusive ``flock`` after re-reading the chain's tail, and synced
after the lock is released, so one worker's fsync does not hold up another's append.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from agent.errors import AuditUnavailable

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_WAIT = 30.0
_OFFLOAD_AT = 2  # records in one loop batch from which the fsync moves off the event loop
# json.dumps builds a new encoder on every call when given options; this one is shared (it keeps no state
# between calls) and produces the same bytes.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _tail(fd: int) -> tuple[str, int]:
    """The hash and seq of the last complete record, to continue the chain (another process may have
    appended since we last wrote)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, 0
    window = 2048  # a few records; grows for a very long last line
    while True:
        start = max(0, size - window)
        data = os.pread(fd, size - start, start)
        lines = data.splitlines()
        if start == 0 or len(lines) > 1:
            break
        window *= 8  # one very long line: read further back
    last = next((ln for ln in reversed(lines) if ln.strip()), b"")
    if not last:
        return GENESIS, 0
    try:
        seq = int(json.loads(last).get("seq", 0))
    except (ValueError, AttributeError):
        seq = 0
    return line_hash(last), seq


class Recordable(Protocol):
    """What the log appends: :class:`agent.core.records.AuditRecord` in the agent."""

    def to_json(self) -> Mapping[str, Any]: ...


class _Pending:
    """A record waiting for the group commit, and whoever waits for it: a thread blocked on ``done``, or
    an event loop awaiting ``future`` (only a waiting thread gets an Event: making one costs microseconds)."""

    __slots__ = ("fields", "done", "error", "future", "loop")

    def __init__(
        self,
        fields: Mapping[str, Any],
        future: asyncio.Future[None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        done: threading.Event | None = None,
    ) -> None:
        self.fields = fields
        self.done = done
        self.error: AuditUnavailable | None = None
        self.future = future
        self.loop = loop

    def finish(self) -> None:
        """On the waiter's own thread or loop (see :func:`_release` for records another thread wrote)."""
        if self.done is not None:
            self.done.set()
        if self.future is not None:
            _resolve(self.future, self.error)


def _release(batch: list[_Pending]) -> None:
    """From the writer thread: wake a written batch's waiters, each event loop once for all of its records."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
    for item in batch:
        if item.loop is None:
            item.finish()
        else:
            by_loop.setdefault(item.loop, []).append(item)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_finish_all, items)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


def _finish_all(items: list[_Pending]) -> None:
    for item in items:
        item.finish()


def _resolve(future: asyncio.Future[None], error: AuditUnavailable | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class AuditLog:
    """Appends chained records; :meth:`record` returns once the record is fsynced, or raises.

    ``flush_on_loop``: for a server that signs on its event loop (no signing threads), records awaited
    from the loop are batched by the loop itself: one write and fsync for everything the requests of one
    loop iteration produced, and no per-record thread hand-offs. A lone record is written inline (nothing
    could overlap its fsync); a batch of several is written and fsynced on a helper thread while the loop
    goes on signing (the same writer thread as for blocking callers), and records arriving meanwhile form the
    next batch.
    """

    def __init__(self, path: Path, *, flush_on_loop: bool = False) -> None:
        self.path = path
        self._flush_on_loop = flush_on_loop
        self._loop_batch: list[_Pending] = []
        self._flush_scheduled = False
        self._write_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._writing = False  # the writer thread is writing a batch (guarded by _cv)
        self._closed = False
        self.last_error: str | None = None
        self._fd = -1
        self._tail_cache: tuple[int, str, int] | None = None  # (file size, prev, seq) after our last write
        self._open()
        self._thread = threading.Thread(target=self._writer, name="audit", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.last_error = None
        except OSError as e:
            self._fd = -1
            self.last_error = f"cannot open audit log {self.path}: {e.strerror}"
            raise AuditUnavailable(self.last_error) from None

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def _enqueue(self, *items: _Pending) -> None:
        with self._cv:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            self._queue.extend(items)
            self._cv.notify()

    def record(self, record: Recordable) -> None:
        """Append one record and wait until it is durable. Raises AuditUnavailable when it is not."""
        done = threading.Event()
        item = _Pending(record.to_json(), done=done)
        self._enqueue(item)
        if not done.wait(_WAIT):
            raise AuditUnavailable(f"audit log {self.path} did not confirm a write within {_WAIT:g}s")
        if item.error is not None:
            raise item.error

    async def record_async(self, record: Recordable) -> None:
        """The same, for the event loop: awaits the group commit without blocking other requests."""
        fields = record.to_json()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._flush_on_loop:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            self._loop_batch.append(_Pending(fields, future))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush_loop)
            await future
            return
        self._enqueue(_Pending(fields, future, loop))
        try:
            await asyncio.wait_for(asyncio.shield(future), _WAIT)
        except asyncio.TimeoutError:
            raise AuditUnavailable(f"audit log {self.path} did not confirm a write within {_WAIT:g}s") from None

    def _writer(self) -> None:
        while True:
            with self._cv:
                self._writing = False
                while not self._queue and not self._closed:
                    self._cv.wait()
                batch, self._queue = self._queue, []
                if not batch and self._closed:
                    return
                self._writing = True
            try:
                self._write(batch, finish=False)  # failures are set on the items
            except BaseException as e:  # noqa: BLE001 - this thread must outlive anything, or requests hang
                for item in batch:
                    item.error = AuditUnavailable(f"audit log {self.path}: {e!r}; signature withheld")
            _release(batch)

    def _flush_loop(self) -> None:
        self._flush_scheduled = False
        batch, self._loop_batch = self._loop_batch, []
        if not batch:
            return
        with self._cv:
            writer_idle = not self._writing and not self._queue
        if len(batch) < _OFFLOAD_AT and writer_idle:
            self._write(batch)
            return
        loop = asyncio.get_running_loop()
        for item in batch:
            item.loop = loop
        try:
            self._enqueue(*batch)
        except AuditUnavailable as e:
            for item in batch:
                item.error = e
            _finish_all(batch)

    def _write(self, batch: list[_Pending], finish: bool = True) -> None:
        with self._write_lock:  # the writer thread and the event loop may both write
            self._write_locked(batch, finish)

    def _write_locked(self, batch: list[_Pending], finish: bool) -> None:
        locked = False
        try:
            if self._fd < 0:
                self._open()  # the log failed before; try again (it may be writable now)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            locked = True
            size = os.fstat(self._fd).st_size
            cached = self._tail_cache
            if cached is not None and cached[0] == size:
                prev, seq = cached[1], cached[2]  # nobody appended since our last batch
            else:
                prev, seq = _tail(self._fd)
            # One timestamp per batch: its records are written and fsynced together, so it is their write time.
            now = _now()
            encode = _ENCODER.encode
            lines = []
            for item in batch:
                seq += 1
                line = encode({"seq": seq, "time": now, **item.fields, "prev": prev}).encode("utf-8")
                prev = line_hash(line)
                lines.append(line)
            lines.append(b"")
            data = b"\n".join(lines)
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, f"short write ({written} of {len(data)} bytes)")
            # The chain is settled once the lines are appended; another worker may append (and fsync) while we
            # sync. Holding the lock through the fsync made the other worker's writer wait for it: 1.3-2.6 ms
            # at p90 under load.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            locked = False
            os.fsync(self._fd)
            self._tail_cache = (size + len(data), prev, seq)
            self.last_error = None
        except Exception as e:  # noqa: BLE001 - whatever went wrong, no waiter may go on as if it were written
            if isinstance(e, AuditUnavailable):
                reason = e.message
            elif isinstance(e, OSError):
                reason = f"{e.strerror or e}"
            else:
                reason = f"{type(e).__name__}: {e}"
            self.last_error = f"cannot write audit log {self.path}: {reason}"
            log.error("%s; refusing to sign until it works", self.last_error)
            if self._fd >= 0:
                os.close(self._fd)  # also releases the lock
                self._fd, locked, self._tail_cache = -1, False, None  # reopen and re-read next time
            for item in batch:
                item.error = AuditUnavailable(f"{self.last_error}; signature withheld")
        finally:
            if locked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            if finish:
                for item in batch:
                    item.finish()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=_WAIT)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    first_bad_line: int | None = None
    reason: str | None = None


def verify(path: Path) -> Verification:
    """Check the chain of an audit file; report the first record whose ``prev`` does not match."""
    prev = GENESIS
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                return Verification(False, count, number, "not a JSON record")
            if not isinstance(record, dict) or record.get("prev") != prev:
                return Verification(False, count, number, "prev does not match the hash of the record before it")
            expected_seq = count + 1
            if record.get("seq") != expected_seq:
                return Verification(False, count, number, f"seq is {record.get('seq')!r}, expected {expected_seq}")
            prev = line_hash(raw)
            count += 1
    return Verification(True, count)
