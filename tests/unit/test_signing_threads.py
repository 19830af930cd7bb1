"""agent/core/signing_threads.py: jobs run on the threads, answers come back to the loop in batches, jobs
nobody waits for any more are skipped. Real threads and a real event loop; the waits are on conditions."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.core.signing_threads import SigningThreads
from agent.dev.testing import wait_until


class Counting(SigningThreads):
    """Counts the loop's wake-ups (each one collects the answers queued so far)."""

    wakeups = 0

    def _collect(self, loop: asyncio.AbstractEventLoop) -> None:
        self.wakeups += 1
        super()._collect(loop)


def test_results_and_exceptions_reach_their_callers_from_named_threads_with_the_initializer() -> None:
    prepared: list[str] = []

    def initializer() -> None:
        prepared.append(threading.current_thread().name)

    def fails() -> str:
        raise KeyError("no such key")

    with SigningThreads(3, name="signer", initializer=initializer) as threads:

        async def main() -> tuple[list[str], BaseException | None]:
            names = await asyncio.gather(*(threads.run(lambda: threading.current_thread().name) for _ in range(20)))
            try:
                await threads.run(fails)
            except KeyError as e:
                return list(names), e
            return list(names), None

        names, error = asyncio.run(main())
    assert len(names) == 20 and all(n.startswith("signer_") for n in names)
    assert threading.current_thread().name not in names
    assert isinstance(error, KeyError)
    assert sorted(prepared) == ["signer_0", "signer_1", "signer_2"]


def test_answers_that_finish_while_the_loop_is_busy_wake_it_once() -> None:
    count = 8
    threads = Counting(count)
    try:

        async def main() -> list[int]:
            loop = asyncio.get_running_loop()
            futures = [threads.run(lambda i=i: i) for i in range(count)]  # type: ignore[misc]
            # The loop is busy (blocked here) while every thread finishes and queues its answer.
            wait_until(lambda: len(threads._answers.get(loop, [])) == count, 10, "every answer queued")
            return list(await asyncio.gather(*futures))

        assert asyncio.run(main()) == list(range(count))
        assert threads.wakeups == 1
    finally:
        threads.shutdown()


def test_a_job_whose_caller_stopped_waiting_before_it_started_is_skipped() -> None:
    ran: list[str] = []
    release = threading.Event()

    def hold() -> str:
        release.wait(10)
        ran.append("hold")
        return "hold"

    with SigningThreads(1) as threads:

        async def main() -> tuple[str, str]:
            first = threads.run(hold)
            abandoned = threads.run(lambda: ran.append("abandoned") or "abandoned")
            abandoned.cancel()  # e.g. its request timed out while the only thread was busy
            last = threads.run(lambda: ran.append("last") or "last")
            release.set()
            return await first, await last

        assert asyncio.run(main()) == ("hold", "last")
    assert ran == ["hold", "last"]


def test_after_shutdown_the_threads_are_gone_and_run_refuses() -> None:
    threads = SigningThreads(2, name="gone")
    threads.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("gone_")]

    async def main() -> None:
        threads.run(lambda: None)

    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(main())


def test_no_threads_is_an_error() -> None:
    with pytest.raises(ValueError):
        SigningThreads(0)
