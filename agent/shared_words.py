"""Words of memory the supervisor shares with the workers it forks, for what each worker publishes.

The map is ``MAP_SHARED | MAP_ANONYMOUS``, made before the fork, so every process sees the same memory.
Each value is one aligned 64-bit word, which the CPU stores and loads whole: a reader never sees half an
update, and a word with one writer needs no lock.
"""

from __future__ import annotations

import mmap

WORD = 8  # bytes: a signed 64-bit integer, the memoryview format "q"


def shared_words(count: int, initial: int) -> memoryview:
    """``count`` signed 64-bit words set to ``initial``, shared with children forked after this call.

    The view keeps its map alive, so the caller holds only the view."""
    words = memoryview(mmap.mmap(-1, WORD * count)).cast("q")
    for index in range(count):
        words[index] = initial
    return words
