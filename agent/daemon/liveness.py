"""Whether each worker still serves: its event loop runs, and no token call of its is stuck too long.

With several workers the supervisor pings systemd's watchdog for all of them, so it must notice a wedged
worker itself. A task on the worker's loop cannot: an inline signature (``sign_threads = 0``, the setting
for local tokens) stuck in the module blocks that very loop. So each worker's loop stamps the time into
memory the supervisor mapped before it forked; the supervisor kills a worker whose stamp is older than
``[token] stuck_limit``, and starts another in its place. (A worker whose loop still runs while a signing
thread is stuck gives up by itself, draining its connections first: ``agent/daemon/worker.py``.)
"""

from __future__ import annotations

import time

from agent.shared_words import shared_words

NOT_STARTED = 0  # a slot with no serving worker: not judged


class Heartbeats:
    """One ``CLOCK_MONOTONIC`` stamp per worker, in nanoseconds (an aligned 64-bit word each: no torn reads),
    shared with the forked workers; the clock is the same in every process."""

    def __init__(self, workers: int) -> None:
        self._stamps = shared_words(workers, NOT_STARTED)

    def slot(self, index: int) -> Heartbeat:
        return Heartbeat(self._stamps, index)

    def silent(self, limit: float) -> list[tuple[int, float]]:
        """(index, seconds since its last beat) of every started worker silent for longer than ``limit``."""
        now = time.monotonic_ns()
        return [
            (index, (now - stamp) / 1e9)
            for index, stamp in enumerate(self._stamps)
            if stamp != NOT_STARTED and now - stamp > limit * 1e9
        ]

    def forget(self, index: int) -> None:
        """Worker ``index`` is gone, or being replaced: not judged until its successor beats."""
        self._stamps[index] = NOT_STARTED


class Heartbeat:
    """One worker's stamp."""

    def __init__(self, stamps: memoryview, index: int) -> None:
        self._stamps, self._index = stamps, index

    def beat(self) -> None:
        self._stamps[self._index] = time.monotonic_ns()


def beat_interval(stuck_limit: float) -> float:
    """How often a worker beats: often enough that a well worker is never judged silent."""
    return min(1.0, stuck_limit / 4)
