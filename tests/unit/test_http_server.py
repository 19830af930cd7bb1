"""How much one connection can make the HTTP server hold (``agent/transport/http.py``), in process.

A real :class:`Server` on a real Unix socket with stub handlers, and raw client sockets driven from the
server's own loop; on asyncio's loop and on uvloop (production's), and where it matters with both kinds of
transport (the loop's own, and ``SenderCheckedTransport`` for connections whose sender is checked):

- a client that pipelines requests and never reads the answers: what the server buffers for it stays
  bounded (write flow control), it is closed after ``idle_timeout``, and others are served meanwhile;
- one read of thousands of tiny pipelined requests queues only a few of them, and they are all answered,
  in order, however the stream ends;
- a request head is bounded by its own bytes, not by those of the requests before it in the same read;
- ``Expect: 100-continue`` on a pipelined request never overtakes the answers to the requests before it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from agent.transport.http import _FEED, _MAX_QUEUED, Admission, Connection, Limits, Request, Response, Server
from agent.transport.sender import SenderCheckedTransport
from tests.unit.test_connection_share import connect, listening, until

RUNNERS: dict[str, Callable[[Awaitable[None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}
TRANSPORTS = {"loop-transport": False, "sender-checked": True}
WAIT = 30.0  # the longest any single step may take before the test fails; never a reason to pass


async def serve(sock: socket.socket, handler: Callable[[Request], Awaitable[Response]], **kw: Any) -> Server:
    check_sender = kw.pop("check_sender", False)
    admission = Admission(check_sender=check_sender)
    server = Server(handler, kw.pop("limits", Limits()), admit=lambda caller: admission)
    await server.start(sock)
    return server


@asynccontextmanager
async def served(
    path: Path, handler: Callable[[Request], Awaitable[Response]], **kw: Any
) -> AsyncIterator[tuple[Server, Client]]:
    """A server listening on ``path`` and one client connected to it; both closed at the end."""
    with listening(path) as sock:
        server = await serve(sock, handler, **kw)
        client = Client(path)
        try:
            yield server, client
        finally:
            client.close()
            await server.shutdown(timeout=2)


async def only_connection(server: Server) -> Connection:
    await until(lambda: len(server.connections) == 1, "the connection opened")
    (conn,) = server.connections
    return conn


class Client:
    """A raw, non-blocking client socket that reads whole (Content-Length framed) answers."""

    def __init__(self, path: Path) -> None:
        self.sock = connect(path)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.pos = 0

    def close(self) -> None:
        self.sock.close()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), WAIT)
        if self.pos > 1 << 16:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data
        return bool(data)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        while (end := self.buf.find(b"\r\n\r\n", self.pos)) < 0:
            if not await self._fill():
                raise ConnectionError(f"closed before a full answer: {bytes(self.buf[self.pos :])!r}")
        lines = self.buf[self.pos : end].decode("latin-1").split("\r\n")
        self.pos = end + 4
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = 0 if status == 100 else int(headers["content-length"])
        while len(self.buf) - self.pos < length:
            if not await self._fill():
                raise ConnectionError("closed mid-body")
        body = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return status, headers, body

    async def closed(self) -> bool:
        """True once the server has closed (end of file or reset) without sending anything more."""
        try:
            return len(self.buf) == self.pos and not await self._fill()
        except ConnectionResetError:
            return True


async def echo_path(request: Request) -> Response:
    return Response(200, request.path.encode(), "text/plain")


# --- 1. a client that does not read its answers ---

ANSWER = b"x" * 20_000
HIGH_WATER = 64 * 1024  # the transports' default high-water mark
BUFFER_BOUND = HIGH_WATER + 2 * len(ANSWER)  # what was buffered when writing paused, plus the answer after it


@pytest.mark.parametrize("check_sender", TRANSPORTS.values(), ids=TRANSPORTS)
@pytest.mark.parametrize("loop", RUNNERS)
def test_a_client_that_never_reads_is_buffered_within_bounds_then_closed(
    short_dir: Path, loop: str, check_sender: bool
) -> None:
    path = short_dir / "s.sock"
    limits = Limits(idle_timeout=1.0)

    async def handler(request: Request) -> Response:
        return Response(200, ANSWER, "text/plain")

    async def go() -> None:
        clock = asyncio.get_running_loop()
        async with served(path, handler, limits=limits, check_sender=check_sender) as (server, stalled):
            conn = await only_connection(server)
            transport = conn.transport
            assert transport is not None
            # 2,000 answers of 20 kB: 40 MB, were they all buffered. The client never reads a byte.
            sending = asyncio.ensure_future(stalled.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 2000))
            most = 0

            async def watch() -> None:
                nonlocal most
                while conn in server.connections:
                    most = max(most, transport.get_write_buffer_size())
                    assert most <= BUFFER_BOUND, f"{most} bytes buffered for a client that reads nothing"
                    await asyncio.sleep(0.001)

            watcher = asyncio.ensure_future(watch())
            try:
                await until(lambda: transport.get_write_buffer_size() > 0 or watcher.done(), "the client stalled")
                stalled_at = clock.time()
                other = Client(path)
                try:
                    await other.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                    status, _, body = await other.response()
                    assert status == 200 and body == ANSWER, "another client is served meanwhile"
                    assert conn in server.connections, "the stalled connection was closed before idle_timeout"
                finally:
                    other.close()
                await asyncio.wait_for(watcher, WAIT)  # the stalled connection is closed (or the bound broken)
                waited = clock.time() - stalled_at
                assert waited >= limits.idle_timeout * 0.9, f"closed {waited:.2f}s after the client stalled"
                await until(lambda: not server.tasks, "its answer loop ended")
            finally:
                watcher.cancel()
                sending.cancel()

    RUNNERS[loop](go())


@pytest.mark.parametrize("check_sender", TRANSPORTS.values(), ids=TRANSPORTS)
@pytest.mark.parametrize("loop", RUNNERS)
def test_a_last_answer_the_client_never_reads_does_not_hold_the_connection(
    short_dir: Path, loop: str, check_sender: bool
) -> None:
    """Closing flushes what was written first; a client that reads none of it is cut off after idle_timeout."""
    path = short_dir / "s.sock"
    limits = Limits(idle_timeout=0.5)

    async def handler(request: Request) -> Response:
        return Response(200, b"x" * 2_000_000, "text/plain")  # more than the kernel's socket buffers take

    async def go() -> None:
        clock = asyncio.get_running_loop()
        async with served(path, handler, limits=limits, check_sender=check_sender) as (server, client):
            conn = await only_connection(server)
            await client.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            await until(lambda: conn._closing, "the answer written and the connection closing")
            closing_at = clock.time()
            await until(lambda: not server.connections, "the connection cut off, its answer unread")
            waited = clock.time() - closing_at
            assert waited >= limits.idle_timeout * 0.9, f"cut off {waited:.2f}s after closing"

    RUNNERS[loop](go())


def test_the_sender_checked_transport_has_asyncios_write_flow_control() -> None:
    async def go() -> None:
        events: list[str] = []

        class Recorder(asyncio.Protocol):
            def pause_writing(self) -> None:
                events.append("pause")

            def resume_writing(self) -> None:
                events.append("resume")

        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        transport = SenderCheckedTransport(loop, ours, Recorder(), os.getpid(), lambda pid: None)
        reader: asyncio.Future[None] | None = None
        try:
            assert transport.get_write_buffer_limits() == (HIGH_WATER // 4, HIGH_WATER)
            transport.set_write_buffer_limits(high=1000)
            assert transport.get_write_buffer_limits() == (250, 1000)
            transport.set_write_buffer_limits(low=100)
            assert transport.get_write_buffer_limits() == (100, 400)
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(high=10, low=20)
            for size in (1 << 16, 1 << 10, 1):  # fill the kernel's buffer: the peer reads nothing yet
                while True:
                    try:
                        ours.send(b"k" * size)
                    except BlockingIOError:
                        break
            transport.write(b"a" * 300)
            assert (transport.get_write_buffer_size(), events) == (300, []), "below the high-water mark"
            transport.write(b"a" * 200)
            assert events == ["pause"], "over it"
            transport.write(b"a" * 1000)
            assert events == ["pause"], "told once"

            async def read() -> None:
                while await loop.sock_recv(peer, 1 << 16):
                    pass

            reader = asyncio.ensure_future(read())
            await until(lambda: events == ["pause", "resume"], "resumed once the peer read")
            await until(lambda: transport.get_write_buffer_size() == 0, "the buffer flushed")
            assert events == ["pause", "resume"]
        finally:
            transport.close()
            if reader is not None:
                await asyncio.wait_for(reader, WAIT)  # end of file: the transport closed its socket
            peer.close()

    asyncio.run(go())


# --- 2. one read of many pipelined requests ---

SHORTEST = len(b"GET /0 HTTP/1.1\r\n\r\n")
QUEUE_BOUND = _MAX_QUEUED + _FEED // SHORTEST  # a piece fed while the queue was not yet full, all of it requests
ENDINGS = {
    "keep-alive": b"",
    "eof": b"",
    "connection-close": b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n",
    "malformed": b"THIS IS NOT HTTP\r\n\r\n",
    "upgrade": b"GET /last HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
}


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("check_sender", TRANSPORTS.values(), ids=TRANSPORTS)
@pytest.mark.parametrize("loop", RUNNERS)
def test_one_read_of_many_pipelined_requests_queues_only_a_few_and_all_are_answered_in_order(
    short_dir: Path, loop: str, check_sender: bool, ending: str
) -> None:
    path = short_dir / "s.sock"
    count = 5000  # about 110 kB: one read of it used to queue thousands of requests

    async def go() -> None:
        gate = asyncio.Event()
        queued: list[int] = []  # how many requests wait behind each one as it reaches the handler

        async def handler(request: Request) -> Response:
            queued.append(len(request.connection._queue))
            if request.path == "/0":
                await gate.wait()
            await asyncio.sleep(0)  # let the connection read (and the test look) between answers
            return await echo_path(request)

        async with served(path, handler, check_sender=check_sender) as (server, client):
            conn = await only_connection(server)
            await client.send(b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(count)) + ENDINGS[ending])
            if ending == "eof":
                client.sock.shutdown(socket.SHUT_WR)
            await until(lambda: bool(queued), "the first request reached the handler")
            most = max(queued[0], len(conn._queue))
            assert most <= QUEUE_BOUND, f"{most} requests queued from one read"

            async def watch() -> None:
                nonlocal most
                while True:
                    most = max(most, len(conn._queue))
                    await asyncio.sleep(0)

            watcher = asyncio.ensure_future(watch())
            gate.set()
            try:
                for i in range(count):
                    status, headers, body = await client.response()
                    assert (status, body) == (200, b"/%d" % i)
                    assert ("connection" in headers) == (i == count - 1 and ending == "eof")  # the last
            finally:
                watcher.cancel()
            assert max(most, *queued) <= QUEUE_BOUND, f"{max(most, *queued)} requests queued at once"
            if ending in ("connection-close", "upgrade"):  # answered (not upgraded), and the last
                status, headers, body = await client.response()
                assert (status, body, headers["connection"]) == (200, b"/last", "close")
            elif ending == "malformed":
                status, headers, _ = await client.response()
                assert status == 400 and headers["connection"] == "close"
            if ending == "keep-alive":
                await client.send(b"GET /after HTTP/1.1\r\n\r\n")
                assert (await client.response())[::2] == (200, b"/after")
            else:
                assert await client.closed()

    RUNNERS[loop](go())


# --- 3. the bound on a request head ---


@pytest.mark.parametrize("loop", RUNNERS)
def test_a_head_is_not_charged_for_the_body_before_it_in_the_same_read(short_dir: Path, loop: str) -> None:
    path = short_dir / "s.sock"
    body = b"a" * Limits().max_body
    post = b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    get = b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n"

    async def go() -> None:
        async with served(path, echo_path) as (server, client):
            await client.send(post + get[:5])  # one write, one read: the body, then a head just begun
            assert (await client.response())[::2] == (200, b"/big")
            await client.send(get[5:])
            status, _, answer = await client.response()
            assert (status, answer) == (200, b"/small")

    RUNNERS[loop](go())


@pytest.mark.parametrize("check_sender", TRANSPORTS.values(), ids=TRANSPORTS)
@pytest.mark.parametrize("loop", RUNNERS)
def test_a_head_that_never_ends_is_431_even_within_one_read(short_dir: Path, loop: str, check_sender: bool) -> None:
    path = short_dir / "s.sock"

    async def go() -> None:
        async with served(path, echo_path, check_sender=check_sender) as (server, client):
            sending = asyncio.ensure_future(client.send(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 300_000))
            status, headers, _ = await client.response()
            assert status == 431 and headers["connection"] == "close"
            assert await client.closed()
            sending.cancel()

    RUNNERS[loop](go())


# --- 4. Expect: 100-continue behind other requests ---


@pytest.mark.parametrize("loop", RUNNERS)
def test_100_continue_on_a_pipelined_request_waits_for_the_answers_before_it(short_dir: Path, loop: str) -> None:
    path = short_dir / "s.sock"

    async def go() -> None:
        gate, entered = asyncio.Event(), asyncio.Event()

        async def handler(request: Request) -> Response:
            if request.path == "/slow":
                entered.set()
                await gate.wait()
            return Response(200, request.path.encode() + request.body, "text/plain")

        async with served(path, handler) as (server, client):
            conn = await only_connection(server)
            await client.send(
                b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
                b"POST /next HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
            )
            # /slow is being answered and the head of /next has been read
            await until(
                lambda: entered.is_set() and conn._current is not None and conn._current.head_done,
                "/slow in the handler, the head of /next read",
            )
            gate.set()
            assert (await client.response())[::2] == (200, b"/slow"), "the first answer is the first request's"
            assert (await client.response())[0] == 100, "then, /next being next, its 100 Continue"
            await client.send(b"{}")
            assert (await client.response())[::2] == (200, b"/next{}")
            # and with nothing before it, the 100 comes at once, as always
            await client.send(b"POST /again HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            assert (await client.response())[0] == 100
            await client.send(b"{}")
            assert (await client.response())[::2] == (200, b"/again{}")

    RUNNERS[loop](go())
