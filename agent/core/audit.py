"""A tamper-evident audit log: one JSON line per signing or refusal, hash-chained, with signed checkpoints.

Each record carries ``seq`` and ``prev``, the SHA-256 of the previous line (see ``agent/core/chain.py``), so
changing, inserting or deleting a line breaks the chain at the next one. Records hold what was signed and
for whom (caller, credential, key fingerprint, SHA-256 of clientData, the challenge, method/path/payload
digest) and never a PIN or a token. Every ``checkpoint_every`` records, every ``checkpoint_interval``
seconds with new records, at rotation and at shutdown, the log signs the chain's head with the audit key on
the token (``agent/core/checkpoint.py``), writes the note to the log *and* to the agent's journal, so a
copy lives outside the file: ``dfns-agent audit verify`` (``agent/core/audit_verify.py``) then detects
edits, truncation and rewrites up to the last checkpoint.

A record is on disk (``fsync``) before the signature it describes is returned; if it cannot be written
the agent refuses to sign (fail closed). Concurrent records share one ``fsync`` (group commit): a writer
thread takes everything queued, appends it, syncs once, then releases every waiting caller (threads
through an event, the server's event loop through a future). Several worker processes may append to the
same file: each batch is appended under an exclusive ``flock`` after re-reading the chain's tail, and synced
after the lock is released, so one worker's fsync does not hold up another's append.

Failures never leave a broken chain: a write that fails or comes up short is cut back (``ftruncate``, under
the lock) to where it started; lines whose fsync fails stay (others may have read them), their signatures
withheld; a torn tail left by a crash mid-write is cut off at the last complete record,
with a warning and a ``repair`` record, before anything is appended; a last record that is not a record at
all is refused (nothing is appended to it). ``seq`` goes on across restarts, recoveries and rotated files.
Rotation (by size or age) starts the next file with a ``rotate`` record chained to the previous file's head.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import logging
import os
import resource
import stat
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from agent import jsonio
from agent.config import AuditConfig
from agent.core.audit_verify import Verification, verify
from agent.core.chain import GENESIS, CorruptTail, Tail, line_ending_at, line_hash, read_tail
from agent.core.checkpoint import NoteSigner, log_line
from agent.core.records import AuditRecord, Event
from agent.core.refusals import RefusalAggregator
from agent.errors import AuditUnavailable

__all__ = ["GENESIS", "AuditLog", "Verification", "line_hash", "verify"]

log = logging.getLogger(__name__)

_WAIT = 30.0
_OFFLOAD_AT = 2  # records in one loop batch from which the fsync moves off the event loop
PROBE_BYTES = 16 * 1024  # health asks the file system for this much room after the log's end
_FALLOC_FL_KEEP_SIZE = 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reason(e: BaseException) -> str:
    if isinstance(e, AuditUnavailable):
        return e.message
    if isinstance(e, OSError):
        return f"{e.strerror or e}"
    return f"{type(e).__name__}: {e}"


_libc: Any = None


def _reserve(fd: int, offset: int, length: int) -> None:
    """Ask the file system for ``length`` bytes after ``offset`` without changing the file's size
    (``fallocate(FALLOC_FL_KEEP_SIZE)``); raises OSError (ENOSPC on a full disk). Where the file system has
    no fallocate, the free space is compared instead."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    st = os.fstatvfs(fd)
    if st.f_bavail * st.f_frsize < length:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _within_size_limit(offset: int, length: int) -> None:
    """The process's own file size limit (``RLIMIT_FSIZE``, e.g. systemd's ``LimitFSIZE=``) stops writes too."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and offset + length > soft:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))


# What a file system that cannot sync a directory (some FUSE and network ones), or a directory the agent may
# write in but not read, answers: nothing more can be done there, so it is no reason to stop signing
# (PostgreSQL's fsync_fname makes the same exception). Anything else (EIO) is.
_CANNOT_SYNC_DIRECTORY = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM}


def _sync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` durable; raises OSError unless the system cannot (see above)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC_DIRECTORY:
            raise
        log.debug("audit log: cannot sync directory %s: %s", directory, e.strerror)


def _record_time(line: bytes) -> float | None:
    try:
        text = json.loads(line)["time"]
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError):
        return None


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

    ``flush_on_loop``: for a server whose records are awaited on its event loop (the agent's, whether it
    signs on the loop or on signing threads), records are batched by the loop itself: one write and fsync
    for everything the requests of one loop iteration produced, and no per-record thread hand-offs. A lone
    record is written inline (nothing could overlap its fsync); a batch of several is written and fsynced on
    a helper thread while the loop goes on signing (the same writer thread as for blocking callers), and
    records arriving meanwhile form the next batch.

    ``settings``: rotation, checkpoint and refusal intervals (``[audit]``); ``signer``: the checkpoint key on
    the token (no checkpoints without one).
    """

    def __init__(
        self,
        path: Path,
        *,
        flush_on_loop: bool = False,
        settings: AuditConfig | None = None,
        signer: NoteSigner | None = None,
    ) -> None:
        self.path = path
        self.settings = settings or AuditConfig()
        self.signer = signer
        self.refusals = RefusalAggregator(self.settings.refusal_interval, now=_now)
        self._flush_on_loop = flush_on_loop
        self._loop_batch: list[_Pending] = []
        self._flush_scheduled = False
        self._write_lock = threading.RLock()
        self._cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._writing = False  # the writer thread is writing a batch (guarded by _cv)
        self._closed = False
        self._checkpoint_wanted = False
        self._last_checkpoint = time.monotonic()
        self.last_error: str | None = None
        # The head this worker last checkpointed: (inode, offset after it, seq, hash). A checkpoint is never
        # signed over a file that no longer holds that head (C2SP: no checkpoint inconsistent with an earlier one).
        self._anchor: tuple[int, int, int, str] | None = None
        self.tampered: str | None = None
        self._fd = -1
        self._tail_cache: tuple[int, Tail] | None = None  # (inode, tail) after our last write
        self._first_time: tuple[int, float | None] | None = None  # (inode, time of its first record)
        self._open()
        self._check_tail()
        self._thread = threading.Thread(target=self._writer, name="audit", daemon=True)
        self._thread.start()
        # Checkpoints are signed on a thread of their own: a slow or hung token must not hold up the records.
        self._sign_now = threading.Event()
        self._signer_thread: threading.Thread | None = None
        if signer is not None:
            self._signer_thread = threading.Thread(target=self._checkpointer, name="audit-checkpoint", daemon=True)
            self._signer_thread.start()
            log.debug("audit checkpoints of %s signed as %s with key %s", path, signer.origin, signer.fingerprint)

    # -- the file ------------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if stat.S_ISREG(os.fstat(self._fd).st_mode):
                # fsync(2) of the file does not make its directory entry durable: a record fsynced into a file
                # just created (by this worker or another) could vanish with the file in a power loss. Sync
                # the directory (and any directory just made) before anything is written through this fd.
                for directory in (self.path.parent, *(p.parent for p in missing)):
                    _sync_directory(directory)
        except OSError as e:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            self.last_error = f"cannot open audit log {self.path}: {e.strerror}"
            raise AuditUnavailable(self.last_error) from None

    def _check_tail(self) -> None:
        """At open: repair a torn tail now (not only at the first write); a last line that is not a record is
        reported (health down, signing refused) rather than appended to."""
        try:
            with self._write_lock:
                fd = self._acquire()
                try:
                    self._tail(fd)
                finally:
                    self._release_lock(fd)
        except (OSError, AuditUnavailable) as e:
            self.last_error = f"cannot write audit log {self.path}: {_reason(e)}"
            log.error("%s; refusing to sign until it works", self.last_error)
            self._drop_fd()

    def _drop_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the lock
        self._fd, self._tail_cache = -1, None

    def _acquire(self) -> int:
        """Open the log if needed and take its exclusive lock, following a rotation another worker made
        (the path then names a new file: reopen it)."""
        for _ in range(16):
            if self._fd < 0:
                self._open()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            mine = os.fstat(self._fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if not stat.S_ISREG(mine.st_mode) or (
                current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev)
            ):
                return self._fd
            self._drop_fd()
        raise AuditUnavailable(f"audit log {self.path} keeps changing under the agent")

    def _release_lock(self, fd: int) -> None:
        if fd >= 0 and fd == self._fd:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _tail(self, fd: int) -> Tail:
        """The chain's end in the locked file: cached when nobody appended since our last write; a torn
        tail is repaired; an empty file continues the newest rotated file's chain, if there is one."""
        st = os.fstat(fd)
        cached = self._tail_cache
        if cached is not None and cached[0] == st.st_ino and cached[1].size == st.st_size:
            return cached[1]
        try:
            tail = read_tail(fd, st.st_size)
        except CorruptTail as e:
            raise AuditUnavailable(
                f"audit log {self.path}: {e}; refusing to append to it (move it aside to start a new file)"
            ) from None
        if tail.torn:
            tail = self._repair(fd, tail)
        if tail.seq == 0 and stat.S_ISREG(st.st_mode):
            tail = self._continue_from_archive(fd, tail)
        self._tail_cache = (st.st_ino, tail)
        return tail

    def _repair(self, fd: int, tail: Tail) -> Tail:
        """Cut a torn tail back to the last complete record and say so in a record. Safe under the lock:
        every writer appends a batch with one write, and cuts back its own failed writes before unlocking,
        so bytes after the last newline are left by a process that died mid-write; no signature was
        answered for them."""
        torn = tail.size - tail.end
        head = os.pread(fd, min(torn, 256), tail.end)
        log.warning(
            "audit log %s ends in %d bytes that are not a complete record (a write cut short by a crash or a "
            "full disk); cutting them off at offset %d and recording the repair",
            self.path,
            torn,
            tail.end,
        )
        os.ftruncate(fd, tail.end)
        fields = {
            "event": Event.REPAIR.value,
            "truncatedBytes": torn,
            "offset": tail.end,
            "truncatedStart": head.decode("utf-8", "replace"),
            "reason": "torn tail: bytes after the last complete record were cut off before appending",
        }
        base = Tail(tail.prev, tail.seq, tail.event, tail.end, tail.end)
        if base.end == 0 and stat.S_ISREG(os.fstat(fd).st_mode):
            # Nothing complete was left (the ``rotate`` record of an emptied live file, cut short): the chain
            # still continues the newest rotated file, as it would have; the repair record follows it.
            return self._continue_from_archive(fd, base, then=[fields])
        return self._append(fd, base, [fields], sync=True)

    def _archives(self) -> list[Path]:
        stem, suffix = self.path.stem, self.path.suffix
        return sorted(p for p in self.path.parent.glob(f"{stem}-*{suffix}") if p.name[len(stem) + 1 :][:1].isdigit())

    def _continue_from_archive(self, fd: int, tail: Tail, then: list[Mapping[str, Any]] | None = None) -> Tail:
        """An empty live file next to rotated ones (an operator moved it away): it starts with a ``rotate``
        record continuing the newest rotated file, as a rotation would have, so the file says where its chain
        comes from and still verifies on its own once retention deletes the files before it. ``then``: records
        appended after it in the same write (and to ``tail`` when there is nothing to continue)."""
        archives = self._archives()
        if not archives:
            return self._append(fd, tail, then, sync=True) if then else tail
        with open(archives[-1], "rb") as f:
            try:
                last = read_tail(f.fileno())
            except CorruptTail:
                return self._append(fd, tail, then, sync=True) if then else tail
        log.warning("audit log %s is empty; continuing the chain of %s (seq %d)", self.path, archives[-1], last.seq)
        fields = {
            "event": Event.ROTATE.value,
            "previousFile": archives[-1].name,
            "previousSeq": last.seq,
            "reason": "the live file was empty: the chain continues from the newest rotated file",
        }
        continued = Tail(last.prev, last.seq, last.event, tail.end, tail.size, last.covers)
        return self._append(fd, continued, [fields, *(then or [])], sync=True)

    def _append(self, fd: int, tail: Tail, items: list[Mapping[str, Any]], *, sync: bool) -> Tail:
        """Append ``items`` (the lock held) as one write; a failed or short write is cut back to where it
        started, so the file never ends in a partial record. Returns the new tail (not yet synced unless
        ``sync``)."""
        now = _now()  # one timestamp per batch: its records are written and fsynced together
        encode = jsonio.dumps
        prev, seq, lines = tail.prev, tail.seq, []
        event: Any = tail.event
        covers: Any = tail.covers
        for fields in items:
            seq += 1
            line = encode({"seq": seq, "time": now, **fields, "prev": prev})
            prev = line_hash(line)
            event, covers = fields.get("event"), fields.get("treeSize")
            lines.append(line)
        lines.append(b"")
        data = b"\n".join(lines)
        start = tail.size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
            if sync:
                os.fsync(fd)
        except OSError:
            self._cut_back(fd, start)
            raise
        end = start + len(data)
        return Tail(prev, seq, event if isinstance(event, str) else None, end, end, covers)

    def _cut_back(self, fd: int, start: int) -> None:
        try:
            if os.fstat(fd).st_size > start:
                os.ftruncate(fd, start)
        except OSError as e:  # the next writer finds a torn tail and repairs it
            log.error("could not cut the audit log %s back to %d bytes: %s", self.path, start, e.strerror)

    def _maybe_rotate(self, fd: int, tail: Tail) -> tuple[int, Tail]:
        if not self._rotation_due(fd, tail):
            return fd, tail
        return self._rotate(fd, tail)

    def _rotation_due(self, fd: int, tail: Tail) -> bool:
        s = self.settings
        if tail.size == 0:
            return False
        due = bool(s.rotate_bytes) and tail.size >= s.rotate_bytes
        if not due and s.rotate_age:
            first = self._first_record_time(fd)
            due = first is not None and time.time() - first >= s.rotate_age
        return due and stat.S_ISREG(os.fstat(fd).st_mode)

    def _first_record_time(self, fd: int) -> float | None:
        ino = os.fstat(fd).st_ino
        if self._first_time is None or self._first_time[0] != ino:
            first = os.pread(fd, 65536, 0).split(b"\n", 1)[0]
            self._first_time = (ino, _record_time(first))
        return self._first_time[1]

    def _rotate(self, fd: int, tail: Tail) -> tuple[int, Tail]:
        """Close this file with a checkpoint of its head, and start the next one with a ``rotate`` record
        that continues the chain. The path never goes missing: the old file gets a second name (a hard
        link), then a prepared new file is renamed over the path."""
        if self.signer is not None and not tail.checkpointed and not self._found_tampered(fd, tail):
            try:
                tail = self._append(fd, tail, [self._checkpoint_fields(tail)], sync=True)
            except AuditUnavailable as e:
                log.error("audit log %s: no checkpoint before rotating: %s", self.path, e.message)
        archive = self.path.with_name(f"{self.path.stem}-{tail.seq:012d}{self.path.suffix}")
        nxt = self.path.with_name(self.path.name + ".next")
        # A fresh file of our own: whatever has the name already (left by a rotation cut short, or a link
        # planted in a directory others can write) is unlinked, never opened and truncated through.
        try:
            os.unlink(nxt)
        except FileNotFoundError:
            pass
        nfd = os.open(nxt, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(nfd, fcntl.LOCK_EX)
            fields = {"event": Event.ROTATE.value, "previousFile": archive.name, "previousSeq": tail.seq}
            new_tail = self._append(nfd, Tail(tail.prev, tail.seq, tail.event, 0, 0), [fields], sync=True)
            try:
                os.link(self.path, archive)
            except FileExistsError:
                if not os.path.samefile(self.path, archive):
                    raise
            os.rename(nxt, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(nfd)
            raise
        log.info("audit log rotated: %s (records up to seq %d) continues in %s", archive, tail.seq, self.path)
        os.close(fd)  # releases the old file's lock: other workers find the path moved on and reopen it
        self._fd = nfd
        self._tail_cache = (os.fstat(nfd).st_ino, new_tail)
        return nfd, new_tail

    # -- checkpoints ---------------------------------------------------------------------------------

    def _checkpoint_fields(self, tail: Tail) -> dict[str, Any]:
        """Sign the head ``tail`` with the audit key (on the token) and log the note: the journal's copy."""
        assert self.signer is not None
        try:
            note = self.signer.sign(tail.seq, tail.prev)
        except Exception as e:  # noqa: BLE001 - the token may be down: records go on without checkpoints
            raise AuditUnavailable(f"could not sign an audit checkpoint: {_reason(e)}") from None
        log.info(log_line(note))
        return {"event": Event.CHECKPOINT.value, "treeSize": tail.seq, "checkpoint": note}

    def checkpoint(self) -> bool:
        """Sign and append a checkpoint of the chain's current head, unless the last record already is one
        (another worker just wrote it) or the log is empty. The token signs outside the file lock: the
        checkpoint covers the head it read, wherever in the file it lands."""
        if self.signer is None or self.tampered is not None:
            return False  # once a file was found cut or rewritten under it, the agent signs nothing more
        self._last_checkpoint = time.monotonic()
        self._checkpoint_wanted = False
        with self._write_lock:
            fd = self._acquire()
            try:
                tail = self._tail(fd)
                ino = os.fstat(fd).st_ino
                tampered = self._found_tampered(fd, tail)
            finally:
                self._release_lock(fd)
        if tampered:
            return False
        if tail.seq == 0 or tail.checkpointed:
            return False
        try:
            fields = self._checkpoint_fields(tail)
        except AuditUnavailable as e:
            log.error("audit log %s: %s", self.path, e.message)
            return False
        item = _Pending(fields)
        self._write([item], finish=False)
        if item.error is None:
            self._anchor = (ino, tail.end, tail.seq, tail.prev)
        return item.error is None

    def _found_tampered(self, fd: int, tail: Tail) -> bool:
        """Whether the agent must sign no checkpoint (the lock held): it found before, or finds now, that the
        file no longer holds the head it last checkpointed. Logged, and health says so from then on."""
        if self.tampered is None:
            problem = self._inconsistent(fd, os.fstat(fd).st_ino, tail)
            if problem is None:
                return False
            self.tampered = f"audit log {self.path}: {problem}; no checkpoint signed over it"
            log.error("%s", self.tampered)
        return True

    def _inconsistent(self, fd: int, ino: int, tail: Tail) -> str | None:
        """Why the file no longer holds the head this worker last checkpointed, or None if it does."""
        if self._anchor is None or self._anchor[0] != ino:
            return None  # nothing checkpointed yet, or the file was rotated since
        _, end, seq, head = self._anchor
        if tail.size < end:
            return f"the file is shorter than when record {seq} was checkpointed (records were cut off)"
        line = line_ending_at(fd, end)
        if line is None or line_hash(line) != head:
            return f"record {seq} is not the one that was checkpointed (the file was edited or rewritten)"
        # And the records since then extend it: each one's prev is the hash of the one before.
        prev, offset, rest = head, end, b""
        while offset < tail.end:
            chunk = os.pread(fd, min(1 << 20, tail.end - offset), offset)
            if not chunk:
                break
            offset += len(chunk)
            *complete, rest = (rest + chunk).split(b"\n")
            for raw in complete:
                try:
                    linked = json.loads(raw).get("prev") == prev
                except (ValueError, AttributeError):
                    linked = False
                if not linked:
                    return f"the records after checkpointed record {seq} do not continue its chain"
                prev = line_hash(raw)
        return None

    def _housekeeping(self, *, final: bool = False) -> None:
        """On the writer thread: summaries of refusal floods whose interval ended, and a checkpoint when one
        is due (``checkpoint_every`` records crossed, ``checkpoint_interval`` passed); the last checkpoint,
        at shutdown, is :meth:`close`'s."""
        summaries = self.refusals.due(everything=final)
        if summaries:
            self._write([_Pending(r.to_json()) for r in summaries], finish=False)
        interval = self.settings.checkpoint_interval
        timed = bool(interval) and time.monotonic() - self._last_checkpoint >= interval
        if self.signer is not None and not final and (self._checkpoint_wanted or timed):
            self._checkpoint_wanted = False
            self._last_checkpoint = time.monotonic()
            self._sign_now.set()

    def _checkpointer(self) -> None:
        while True:
            self._sign_now.wait()
            self._sign_now.clear()
            if self._closed:
                return
            try:
                self.checkpoint()
            except Exception as e:  # noqa: BLE001 - a failed checkpoint must not end the thread
                log.error("audit log %s: no checkpoint: %s", self.path, _reason(e))

    def _next_wake(self) -> float | None:
        waits = [self.refusals.next_deadline()]
        if self.signer is not None and self.settings.checkpoint_interval:
            waits.append(max(0.0, self._last_checkpoint + self.settings.checkpoint_interval - time.monotonic()))
        known = [w for w in waits if w is not None]
        return min(known) if known else None

    # -- health ----------------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def probe(self) -> str | None:
        """None if the log can take more records right now, else why not. Asked of the file itself (room
        for :data:`PROBE_BYTES` more, reserved under the lock with ``fallocate``), so every worker that
        shares the file gives the same answer, whichever of them last failed or succeeded to write."""
        if self.tampered is not None:
            return self.tampered
        with self._write_lock:
            try:
                fd = self._acquire()
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        return self.last_error  # a device: only a write can tell
                    tail = self._tail(fd)
                    _within_size_limit(tail.size, PROBE_BYTES)
                    _reserve(fd, tail.size, PROBE_BYTES)
                    os.ftruncate(fd, tail.size)  # give the reservation back
                    # The next append rotates first, which makes two files next to this one.
                    if self._rotation_due(fd, tail) and not os.access(self.path.parent, os.W_OK | os.X_OK):
                        return f"cannot rotate audit log {self.path}: its directory is not writable by the agent"
                finally:
                    self._release_lock(fd)
            except (OSError, AuditUnavailable) as e:
                self._drop_fd()
                return f"cannot write audit log {self.path}: {_reason(e)}"
        return None

    # -- records ---------------------------------------------------------------------------------------

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

    async def refusal(self, record: AuditRecord) -> bool:
        """Record a refusal, aggregated per caller and reason (``agent/core/refusals.py``): the first of an
        interval is written (and awaited) now, the others only counted into the interval's summary.
        True when this one was the first (callers log only those, for the same reason)."""
        if self.refusals.admit(record):
            await self.record_async(record)
            return True
        return False

    def _writer(self) -> None:
        while True:
            with self._cv:
                self._writing = False
                if not self._queue and not self._closed and not self._checkpoint_wanted:
                    self._cv.wait(self._next_wake())
                batch, self._queue = self._queue, []
                closing = self._closed and not batch
                self._writing = True
            if batch:
                try:
                    self._write(batch, finish=False)  # failures are set on the items
                except BaseException as e:  # noqa: BLE001 - this thread must outlive anything, or requests hang
                    for item in batch:
                        item.error = AuditUnavailable(f"audit log {self.path}: {e!r}; signature withheld")
                _release(batch)
            try:
                self._housekeeping(final=closing)
            except BaseException as e:  # noqa: BLE001 - housekeeping must not end the writer
                log.error("audit log %s: %s", self.path, _reason(e))
            if closing:
                return

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
        fd = -1
        try:
            fd = self._acquire()
            tail = self._tail(fd)
            fd, tail = self._maybe_rotate(fd, tail)
            new = self._append(fd, tail, [item.fields for item in batch], sync=False)
            # The chain is settled once the lines are appended; another worker may append (and fsync) while we
            # sync. Holding the lock through the fsync made the other worker's writer wait for it: 1.3-2.6 ms
            # at p90 under load.
            self._release_lock(fd)
            # A failed fsync leaves the lines where they are: another worker may have read them since the lock
            # was released (its cached tail, a checkpoint it is signing, a rotation), and taking them out would
            # leave it chained to records that no longer exist. Their signatures are withheld below; a record
            # without an answer is harmless, an answer without a record is not.
            os.fsync(fd)
            self._tail_cache = (os.fstat(fd).st_ino, new)
            self.last_error = None
            every = self.settings.checkpoint_every
            if self.signer is not None and every and tail.seq // every != new.seq // every:
                self._checkpoint_wanted = True
                with self._cv:
                    self._cv.notify()
        except Exception as e:  # noqa: BLE001 - whatever went wrong, no waiter may go on as if it were written
            self.last_error = f"cannot write audit log {self.path}: {_reason(e)}"
            log.error("%s; refusing to sign until it works", self.last_error)
            self._drop_fd()  # reopen and re-read next time
            for item in batch:
                item.error = AuditUnavailable(f"{self.last_error}; signature withheld")
        finally:
            if finish:
                for item in batch:
                    item.finish()

    def close(self) -> None:
        """Stop the writer after the queue, the refusal summaries and a last checkpoint are written."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=_WAIT)
        if self._signer_thread is not None:
            self._sign_now.set()
            self._signer_thread.join(timeout=_WAIT)
            try:
                self.checkpoint()
            except Exception as e:  # noqa: BLE001 - closing goes on
                log.error("audit log %s: no checkpoint at shutdown: %s", self.path, _reason(e))
        self._drop_fd()
