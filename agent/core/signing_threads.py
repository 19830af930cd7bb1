"""Signing threads: a module's blocking calls off the event loop, with one loop wake-up per batch of answers.

A network HSM holds each signature for milliseconds, so the agent signs on threads (``[server]
sign_threads``) while its loop serves other requests. ``loop.run_in_executor`` on a ``ThreadPoolExecutor``,
bounded by ``asyncio.wait_for``, costs 144-160 us of CPU per call here (64 callers, 8 threads, 2 ms calls):
a concurrent future, an asyncio future chained to it, a task, and a loop wake-up (``call_soon_threadsafe``)
for every answer. These threads take jobs from one queue and hand answers back in batches: a thread that
finishes while the loop has not yet collected earlier answers adds its own to them instead of waking the
loop again. The same calls, bounded by a timer, cost 67-75 us.

A job whose future is already done when a thread takes it (its caller was cancelled, or timed out) is
skipped, as a ``ThreadPoolExecutor`` skips a cancelled one; a job already running goes on, and its answer
is dropped.

Shutting down joins the threads for at most ``SHUTDOWN_WAIT`` seconds: a thread still in a call then is stuck
in the module (a hung HSM), and is left to the process's exit (they are daemon threads). The token's close
waits a bounded time for such a call too, and never closes the session under it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["SigningThreads"]

log = logging.getLogger(__name__)

# Seconds shutdown() waits for the threads. With the token's close (3 s for a call in progress) it stays
# within the 5 s the supervisor gives a worker after its drain.
SHUTDOWN_WAIT = 1.0

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("fn", "future", "loop", "result", "error")

    def __init__(self, fn: Callable[[], T], future: asyncio.Future[T], loop: asyncio.AbstractEventLoop) -> None:
        self.fn, self.future, self.loop = fn, future, loop
        self.result: T | None = None
        self.error: BaseException | None = None

    def settle(self) -> None:
        """On the job's loop: hand the answer to its caller, unless the caller stopped waiting."""
        if self.future.done():
            return
        if self.error is None:
            self.future.set_result(self.result)  # type: ignore[arg-type]
        else:
            self.future.set_exception(self.error)
        self.error = None  # no reference cycle through the traceback


class SigningThreads:
    """``count`` threads running ``run``'s functions in the order they came; each thread first calls
    ``initializer`` (the agent's blocks the signals the main thread takes)."""

    def __init__(self, count: int, *, name: str = "sign", initializer: Callable[[], None] | None = None) -> None:
        if count < 1:
            raise ValueError("at least one signing thread")
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._answers: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}  # answers each loop has yet to collect
        self._initializer = initializer
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(count)]
        for t in self._threads:
            t.start()

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()`` on a signing thread; the future (of the running loop) gets its result or exception."""
        if self._closed:
            raise RuntimeError("the signing threads are shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, future, loop))
        return future

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while (job := self._jobs.get()) is not None:
            if job.future.done():  # read across threads: at worst an abandoned job still runs
                continue
            try:
                job.result = job.fn()
            except BaseException as e:  # noqa: BLE001 - the caller gets it, as from an executor
                job.error = e
            self._answer(job)
            job = None  # noqa: F841 - drop this thread's reference while it waits for the next

    def _answer(self, job: _Job[Any]) -> None:
        with self._lock:
            waiting = self._answers.get(job.loop)
            if waiting is not None:  # the loop is already woken for earlier answers: it takes this one too
                waiting.append(job)
                return
            self._answers[job.loop] = [job]
        try:
            job.loop.call_soon_threadsafe(self._collect, job.loop)
        except RuntimeError:  # that loop is closed: nobody waits any more
            with self._lock:
                self._answers.pop(job.loop, None)

    def _collect(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            jobs = self._answers.pop(loop, [])
        for job in jobs:
            job.settle()

    def shutdown(self, *, wait: bool = True, timeout: float = SHUTDOWN_WAIT) -> None:
        """No new jobs; the threads end after the queued ones. ``wait``: join them, as leaving a
        ``ThreadPoolExecutor`` block does (before the token they call into is closed), but for at most
        ``timeout`` seconds: one still in a call then is stuck in the module, and is left behind (logged)."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            deadline = time.monotonic() + timeout
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
            stuck = [t.name for t in self._threads if t.is_alive()]
            if stuck:
                log.error(
                    "signing thread(s) %s still in a token call after %.1fs: not waiting for them (the module "
                    "hangs); the process's exit ends them",
                    ", ".join(stuck),
                    timeout,
                )

    def __enter__(self) -> SigningThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
