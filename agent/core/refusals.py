"""Refusals aggregated per caller, so a caller hammering the agent cannot fill the disk with records.

The first refusal of a caller (uid, gid, pid, exe) for one reason (code and message) in an interval is
recorded at once, as before; the ones after it in the same interval are only counted, and one summary record
with their ``count`` is written when the interval ends (or the log closes). A flood thus costs at most
two records per caller, reason and interval in each worker process. The table is bounded: beyond
:data:`MAX_KEYS` distinct callers and reasons in one interval (a caller forking new pids, or varying the
reason through the credential names or paths it asks for), the rest are counted together per uid and code.
At worst a worker writes about ``2 * MAX_KEYS`` records per interval plus two per uid refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.core.records import AuditRecord

MAX_KEYS = 64

RefusalKey = tuple[object, ...]


@dataclass
class _Window:
    started: float  # monotonic
    first_time: str  # wall clock, for the summary
    last: AuditRecord
    suppressed: int = 0
    last_time: str = ""


def _key(record: AuditRecord) -> RefusalKey:
    c = record.caller
    who = (c.uid, c.gid, c.pid, c.exe) if c is not None else (None, None, None, None)
    return (*who, record.code, record.reason)


class RefusalAggregator:
    """Decides which refusals are written now and which are counted into a later summary."""

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic, now: Callable[[], str]) -> None:
        self.interval = interval
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        self._windows: dict[RefusalKey, _Window] = {}
        self._ended: list[AuditRecord] = []

    def admit(self, record: AuditRecord) -> bool:
        """True if ``record`` is to be written now (the first of its caller and reason in this interval);
        otherwise it has been counted and will be in a summary."""
        key = _key(record)
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None and len(self._windows) >= MAX_KEYS:
                key, record = self._overflow(record)
                window = self._windows.get(key)
            if window is not None and now - window.started >= self.interval:
                self._end(key, window)  # its summary waits for the next :meth:`due`
                window = None
            if window is None:
                self._windows[key] = _Window(now, self._now(), record)
                return True
            window.suppressed += 1
            window.last, window.last_time = record, self._now()
            return False

    def _end(self, key: RefusalKey, window: _Window) -> None:
        del self._windows[key]
        if window.suppressed:
            self._ended.append(
                replace(window.last, count=window.suppressed, first_time=window.first_time, last_time=window.last_time)
            )

    @staticmethod
    def _overflow(record: AuditRecord) -> tuple[RefusalKey, AuditRecord]:
        c = record.caller
        uid = c.uid if c is not None else None
        # The caller stays: the bucket is its uid's (the pid and exe are those of the last one, as in every summary).
        generic = replace(record, reason="refusals of more callers and reasons than the audit log tracks")
        return ("overflow", uid, record.code), generic

    def due(self, *, everything: bool = False) -> list[AuditRecord]:
        """Summary records of the intervals that have ended (all of them with ``everything``, at close)."""
        now = self._clock()
        with self._lock:
            for key, window in list(self._windows.items()):
                if everything or now - window.started >= self.interval:
                    self._end(key, window)
            out, self._ended = self._ended, []
        return out

    def next_deadline(self) -> float | None:
        """Seconds until the earliest window ends, or None when none is open."""
        with self._lock:
            if self._ended:
                return 0.0
            if not self._windows:
                return None
            earliest = min(w.started for w in self._windows.values())
        return max(0.0, earliest + self.interval - self._clock())
