"""agent/core/signing_threads.py at shutdown while a token call never returns (a hung HSM or network link).

The hung call is a function blocked on an event in place of a module call that does not come back: the
threads' contract is the same whatever they call, and a module hangs only on demand with an external lock
(see ``tests/device/test_token_recovery.py``). The worker leaves its ``SigningThreads`` block (which shuts
them down and joins them) before it closes the token, and the token's close waits a bounded time for such a
call, then leaves the session to the process's exit; joining the stuck thread without a bound made the
shutdown itself hang, so the process never got there.
"""

from __future__ import annotations

import asyncio
import threading

from agent.core.signing_threads import SigningThreads
from agent.dev.testing import wait_until


def test_shutdown_does_not_wait_forever_for_a_call_stuck_in_the_module() -> None:
    release = threading.Event()
    entered = threading.Event()

    def hung_sign() -> bytes:
        entered.set()
        release.wait()  # a C_Sign that never returns, until the test ends
        return b"late"

    threads = SigningThreads(2, name="hung")
    shut = threading.Event()
    try:

        async def main() -> None:
            future = threads.run(hung_sign)
            await asyncio.get_running_loop().run_in_executor(None, entered.wait)
            future.cancel()  # the request timed out (504 token_timeout) and was answered

        asyncio.run(main())

        def stop() -> None:
            threads.shutdown()  # what leaving the worker's `with SigningThreads(...)` does
            shut.set()

        threading.Thread(target=stop, name="stopping", daemon=True).start()
        wait_until(shut.is_set, 30, "shutdown() to return while a call is stuck")
        # The idle thread is gone; the stuck one is left to the process's exit (the threads are daemons).
        alive = [t for t in threading.enumerate() if t.name.startswith("hung_")]
        assert len(alive) == 1 and alive[0].daemon
    finally:
        release.set()
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("hung_")], 10, "the threads to end")
