"""How workers that accept on one listening socket share its connections (``agent/transport/share.py``).

The counts live in shared memory that forked workers see; each worker's :class:`Server` publishes how many
connections it holds, and one that holds more than another live worker lets that one take the next. Here two
servers in one loop listen on two descriptors of one real listening Unix socket, as two workers do on the
socket they inherit; a peer that publishes a count but never accepts is what a busy or stuck worker looks
like to the others.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.transport.http import Limits, Request, Response, Server
from agent.transport.share import ABSENT, ConnectionShare


async def never_asked(request: Request) -> Response:
    raise AssertionError("these tests send no request")


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (the loop keeps serving meanwhile); fail after 30 s, never sooner."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.001)


@contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    try:
        yield sock
    finally:
        sock.close()


def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))  # completes in the backlog; a server accepts it later
    return client


def test_counts_are_shared_with_a_forked_worker_and_a_worker_that_left_is_not_waited_for() -> None:
    share = ConnectionShare(3)
    assert share.counts() == (ABSENT, ABSENT, ABSENT)
    pid = os.fork()
    if pid == 0:  # the worker: publishes into the memory mapped before the fork, then exits
        share.slot(1).publish(3)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert share.counts() == (ABSENT, 3, ABSENT)
    me = share.slot(0)
    me.publish(3)
    assert not me.ahead(), "as many as the other live worker: not ahead"
    me.publish(4)
    assert me.ahead(), "one more than a live worker"
    share.leave(1)  # the supervisor reaped it
    assert not me.ahead(), "absent workers (slot 2 never started, slot 1 gone) are not waited for"
    me.leave()
    assert share.counts() == (ABSENT, ABSENT, ABSENT)


def test_two_servers_on_one_socket_take_its_connections_in_turn(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def go() -> None:
        share = ConnectionShare(2)
        with listening(path) as sock:
            servers = [Server(never_asked, Limits(), share=share.slot(i)) for i in range(2)]
            for server in servers:
                await server.start(sock.dup())  # each worker's own descriptor of the inherited socket
            assert share.counts() == (0, 0)
            clients = []
            try:
                for n in range(1, 9):
                    clients.append(connect(path))
                    await until(lambda n=n: sum(share.counts()) == n, f"connection {n} accepted")
                    a, b = share.counts()
                    assert abs(a - b) <= 1, f"after {n} connections: {a} and {b}"
                assert share.counts() == (4, 4)
                await until(lambda: [len(s.connections) for s in servers] == [4, 4], "each server's four opened")
            finally:
                for client in clients:
                    client.close()
                for server in servers:
                    await server.shutdown(timeout=5)
        assert share.counts() == (ABSENT, ABSENT), "a stopped server is not waited for"

    asyncio.run(go())


def test_a_server_ahead_of_a_worker_that_never_accepts_still_takes_the_connection(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def go() -> None:
        share = ConnectionShare(2)
        share.slot(1).publish(0)  # a live worker that holds nothing and accepts nothing (busy, or stuck)
        with listening(path) as sock:
            server = Server(never_asked, Limits(), share=share.slot(0))
            await server.start(sock)
            clients = [connect(path) for _ in range(3)]
            try:
                # counted when accepted; in server.connections once its transport is made
                await until(lambda: len(server.connections) == 3, "the connections accepted after each yield")
                assert share.counts() == (3, 0)
            finally:
                for client in clients:
                    client.close()
                await server.shutdown(timeout=5)

    asyncio.run(go())


def test_a_server_publishes_its_connections_as_they_open_and_close(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def go() -> None:
        share = ConnectionShare(1)
        with listening(path) as sock:
            server = Server(never_asked, Limits(), share=share.slot(0))
            await server.start(sock)
            first, second = connect(path), connect(path)
            await until(lambda: share.counts() == (2,), "two connections published")
            first.close()
            await until(lambda: share.counts() == (1,), "a closed connection unpublished")
            second.close()
            await until(lambda: share.counts() == (0,), "none left")
            await server.shutdown(timeout=5)
        assert share.counts() == (ABSENT,)

    asyncio.run(go())
