"""How workers that accept on one listening socket share its connections evenly.

Every worker's loop wakes for a new connection and the first to call ``accept`` gets it. A worker whose
loop is hot wins most races, so a burst of connections could all land on one worker while the other served
nothing: with two workers, the benchmark's 16 P-256 clients went at about 1,200 sig/s in such rounds and
2,900 in balanced ones (Unix sockets have no ``SO_REUSEPORT`` balancing). So each worker publishes how many
connections it holds, and one that holds more than another live worker steps back for a moment
(:data:`YIELD_SECONDS`) and takes the connection only if nobody else did meanwhile: a worker that is busy
or stuck delays a new connection by that moment at most, never refuses it.
"""

from __future__ import annotations

from agent.shared_words import shared_words

ABSENT = -1  # a slot with no serving worker: not waited for
YIELD_SECONDS = 0.002


class ConnectionShare:
    """The workers' connection counts, in anonymous shared memory mapped by the supervisor before it forks
    them, so that each worker sees the others' counts (one aligned 64-bit word each: no torn reads)."""

    def __init__(self, workers: int) -> None:
        self._counts = shared_words(workers, ABSENT)

    def slot(self, index: int) -> WorkerSlot:
        return WorkerSlot(self._counts, index)

    def counts(self) -> tuple[int, ...]:
        """Each worker's published count (:data:`ABSENT` for none), as every worker sees it now."""
        return tuple(self._counts)

    def leave(self, index: int) -> None:
        """Worker ``index`` is gone (it ended, or crashed before it could say so)."""
        self._counts[index] = ABSENT


class WorkerSlot:
    """One worker's view: its own count to publish, and whether it holds more than another live worker."""

    def __init__(self, counts: memoryview, index: int) -> None:
        self._counts, self._index = counts, index

    def publish(self, connections: int) -> None:
        self._counts[self._index] = connections

    def leave(self) -> None:
        self._counts[self._index] = ABSENT

    def ahead(self) -> bool:
        mine = self._counts[self._index]
        return any(ABSENT < count < mine for index, count in enumerate(self._counts) if index != self._index)
