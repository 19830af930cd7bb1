"""Trailer headers after a chunked body are bounded like a request head (``agent/transport/http.py``).

A real :class:`Server` on a real Unix socket, a raw client. The head's size is checked while it arrives, but
once the head is done only body bytes were counted: trailers (``0\\r\\nX: …``) are neither, and httptools
accumulates a header value that has not ended in memory, so a client could grow the worker's memory for
the whole ``body_timeout``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.transport.http import Limits
from tests.unit.test_http_server import RUNNERS, TRANSPORTS, echo_path, served


@pytest.mark.parametrize("check_sender", TRANSPORTS.values(), ids=TRANSPORTS)
@pytest.mark.parametrize("loop", RUNNERS)
def test_a_trailer_that_never_ends_is_431(short_dir: Path, loop: str, check_sender: bool) -> None:
    path = short_dir / "s.sock"
    # A body deadline beyond the client's wait: only the size bound may end this request.
    limits = Limits(body_timeout=3600.0)
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-Pad: "

    async def go() -> None:
        async with served(path, echo_path, check_sender=check_sender, limits=limits) as (server, client):
            sending = asyncio.ensure_future(client.send(head + b"a" * 300_000))
            status, headers, body = await client.response()
            assert status == 431 and headers["connection"] == "close"
            assert b'"code":"headers_too_large"' in body.replace(b" ", b"")
            assert await client.closed()
            sending.cancel()

    RUNNERS[loop](go())


@pytest.mark.parametrize("loop", RUNNERS)
def test_a_chunked_body_with_small_trailers_is_served(short_dir: Path, loop: str) -> None:
    path = short_dir / "s.sock"
    request = b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: 1\r\n\r\n"

    async def go() -> None:
        async with served(path, echo_path) as (server, client):
            await client.send(request)
            assert (await client.response())[::2] == (200, b"/t")

    RUNNERS[loop](go())


@pytest.mark.parametrize("loop", RUNNERS)
def test_a_chunked_body_that_stops_in_its_trailers_is_408(short_dir: Path, loop: str) -> None:
    path = short_dir / "s.sock"
    limits = Limits(body_timeout=0.2)
    request = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: 1"

    async def go() -> None:
        async with served(path, echo_path, limits=limits) as (server, client):
            await client.send(request)
            status, headers, body = await client.response()
            assert status == 408 and headers["connection"] == "close"
            assert b"request_timeout" in body

    RUNNERS[loop](go())
