"""Many signers or one recovery: recovery must never finalize the module under a running call."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Gate:
    """A readers-writer gate: signatures share it, recovery takes it alone.

    ``shared()`` runs on every signature, so it returns one reusable object over a plain Lock: a
    generator-based context manager over the Condition's default RLock cost about 5 µs a call, this about 2.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._readers = 0
        self._writer = False
        self._shared = Shared(self)

    def shared(self) -> Shared:
        return self._shared

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            while self._writer:
                self._cv.wait()
            self._writer = True
            while self._readers:
                self._cv.wait()
        try:
            yield
        finally:
            with self._lock:
                self._writer = False
                self._cv.notify_all()


class Shared:
    """The reader side of a :class:`Gate`; keeps no state of its own, so one instance serves every thread."""

    __slots__ = ("_gate",)

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        gate = self._gate
        with gate._lock:
            while gate._writer:
                gate._cv.wait()
            gate._readers += 1

    def __exit__(self, *exc: object) -> None:
        gate = self._gate
        with gate._lock:
            gate._readers -= 1
            if not gate._readers and gate._writer:  # only a writer waits for the readers to drain
                gate._cv.notify_all()
