"""A small HTTP/1.1 server for the agent's Unix socket: httptools (llhttp) parses, asyncio.Protocol serves.

Why not aiohttp's server: for every request it builds a request object, a response object, a middleware
chain and a streaming writer. On a token that signs in 0.2 ms that machinery cost more CPU than the
signature (``python -m bench``; the README has the figures). The agent needs little of it: small bodies that
arrive whole, small JSON answers, keep-alive, and hard limits. Requests on one connection are answered in
order (pipelining works); a handler never sees a partial body.

Limits, all per connection: a request head must arrive within ``idle_timeout`` of the connection opening or
of the previous answer (else the connection is closed without an answer: nobody is listening); a body must
arrive within ``body_timeout`` of its head (408); a body larger than ``max_body`` is refused at once (413),
and so is a head over 64 KiB (431); at most ``max_connections`` connections are served, the rest get a fixed
503 and are closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import httptools

log = logging.getLogger(__name__)

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_MAX_QUEUED = 16  # pipelined requests read ahead per connection before reading pauses
_MAX_HEAD = 64 * 1024  # request line and headers; llhttp itself sets no bound
_DRAIN_POLL = 0.005  # how often a drain looks whether every accepted connection has sent its request


@dataclass
class Limits:
    max_body: int = 64 * 1024
    body_timeout: float = 10.0
    idle_timeout: float = 15.0
    max_connections: int = 256
    drain_grace: float = 0.5  # on stop, how long an accepted connection may still take to send its request


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode())


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def internal_error(method: str, path: str) -> Response:
    """The answer to a handler that failed unexpectedly; the traceback goes to the log, not to the client.
    Call it from the ``except`` block."""
    log.exception("unexpected error in %s %s", method, path)
    return error_response(500, "internal_error", "internal error; see the agent's log")


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    connection: Connection
    keep_alive: bool = True
    context: dict[str, Any] = field(default_factory=dict)  # what the application learns while handling it


Handler = Callable[[Request], Awaitable[Response]]


def _encode(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
    ]
    lines += [f"{k}: {v}" for k, v in response.headers.items()]
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return head if head_only else head + response.body


_BUSY = error_response(503, "too_many_connections", "the agent is at its connection limit")
_BUSY_BYTES = _encode(_BUSY, keep_alive=False)


class _Busy(asyncio.Protocol):
    """Answers a connection over the limit with a fixed 503 and closes it, without reading the request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        cast(asyncio.Transport, transport).write(_BUSY_BYTES)
        transport.close()


class _Pending:
    __slots__ = ("method", "url", "headers", "body", "head_done")

    def __init__(self) -> None:
        self.method = ""
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.head_done = False


class Connection(asyncio.Protocol):
    """One client connection: parse, queue complete requests, answer them one at a time, in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.context: dict[str, Any] = {}  # the application's per-connection cache (e.g. the peer's identity)
        self._parser = httptools.HttpRequestParser(self)
        self._current: _Pending | None = None
        self._size = 0  # body bytes of the current request
        self._head_size = 0  # bytes received while the current request's head is incomplete
        self._queue: deque[Request | Response] = deque()  # a Response: a refusal of what followed, then close
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        # One deadline at a time: for the next request's head (idle), or for the body of the current one.
        # The timer is re-armed lazily, so a busy keep-alive connection does not churn a timer per request.
        self._deadline: float | None = None
        self._on_deadline: Callable[[], None] = self._idle
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closing = False
        self._stopped = False  # no further request is read (Connection: close, EOF, error)
        self._paused = False

    # --- transport events ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self._expect(self.limits.idle_timeout, self._idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._disarm()
        self.server.connections.discard(self)
        self._queue.clear()  # an answer in progress still finishes (and is audited); nobody reads it

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol upgrades here: answer what was complete (if anything), then close.
            if self._task is None and not self._queue:
                self._fail(400, "invalid_request", "protocol upgrades are not supported")
            else:
                self._stop_reading()
            return
        except httptools.HttpParserError as e:
            if not self._stopped:  # (after "Connection: close" anything more is an error, and ignored)
                log.debug("malformed request: %s", e)
                self._fail(400, "invalid_request", "malformed HTTP request")
            return
        pending = self._current
        if pending is None:
            return
        if not pending.head_done:
            self._head_size += len(data)
            if self._head_size > _MAX_HEAD:
                self._fail(431, "headers_too_large", f"request line and headers exceed {_MAX_HEAD} bytes")
        elif self._on_deadline != self._body_late:
            self._expect(self.limits.body_timeout, self._body_late)  # the body straddles reads

    def eof_received(self) -> bool | None:
        # The client shut down its side: answer what it sent completely, then close.
        self._stop_reading()
        if self._task is None and not self._queue:
            self._close()
        return True  # keep the transport open until the answers are written

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        if not self._stopped:
            self._current = _Pending()
            self._size = self._head_size = 0

    def on_url(self, url: bytes) -> None:
        if self._current is not None:
            self._current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._current is not None:
            self._current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        pending = self._current
        if pending is None:
            return
        pending.head_done = True
        pending.method = self._parser.get_method().decode("latin-1")
        length = pending.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body:
            self._too_large()
            return
        if pending.headers.get("expect", "").lower() == "100-continue":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._current is None:
            return
        self._size += len(body)
        if self._size > self.limits.max_body:
            self._too_large()
            return
        self._current.body.append(body)

    def on_message_complete(self) -> None:
        pending, self._current = self._current, None
        if pending is None or self._closing:
            return
        self._clear_deadline()  # nothing is awaited from the client while its request is answered
        keep_alive = self._parser.should_keep_alive()
        try:
            url = httptools.parse_url(pending.url)
            path = url.path.decode("latin-1")
            query = (url.query or b"").decode("latin-1")
        except httptools.HttpParserInvalidURLError:
            path, query = pending.url.decode("latin-1"), ""
        request = Request(pending.method, path, query, pending.headers, b"".join(pending.body), self, keep_alive)
        self._queue.append(request)
        if not keep_alive:
            self._stop_reading()  # nothing after a "Connection: close" request is read
        elif len(self._queue) >= _MAX_QUEUED and not self._paused:
            self._paused = True
            self._transport().pause_reading()
        self._start()

    def _start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._answer())
            self.server.tasks.add(self._task)

    # --- answering ---

    async def _answer(self) -> None:
        try:
            while self._queue:
                request = self._queue.popleft()
                if isinstance(request, Response):
                    self.server.on_protocol_error(request.status)
                    self._write(_encode(request, keep_alive=False))
                    self._close()
                    return
                try:
                    response = await self.server.handler(request)
                except Exception:  # the application maps its own errors; this is the last resort
                    response = internal_error(request.method, request.path)
                # The last answer before a close says so (client's Connection: close, EOF, upgrade, drain).
                keep_alive = request.keep_alive and not self.server.draining and not (self._stopped and not self._queue)
                if self._closing:
                    return
                self._write(_encode(response, keep_alive, head_only=request.method == "HEAD"))
                if not keep_alive:
                    self._close()
                    return
                if self._paused and len(self._queue) < _MAX_QUEUED // 2:
                    self._paused = False
                    self._transport().resume_reading()
            if self._stopped:
                self._close()
            elif self._current is not None and self._current.head_done:
                self._expect(self.limits.body_timeout, self._body_late)
            else:  # the next request's head (or the rest of it) is due within the idle timeout
                self._expect(self.limits.idle_timeout, self._idle)
        finally:
            if self._task is not None:
                self.server.tasks.discard(self._task)
            self._task = None

    def _stop_reading(self) -> None:
        self._stopped = True
        self._current = None
        self._clear_deadline()

    # --- limits ---

    def _idle(self) -> None:
        # Silent, slow or finished: nobody is waiting for an answer.
        self._close()

    def _body_late(self) -> None:
        limit = self.limits.body_timeout
        self._fail(408, "request_timeout", f"request body not received within {limit:g}s")

    def _too_large(self) -> None:
        self._fail(413, "payload_too_large", f"request body is larger than {self.limits.max_body} bytes")

    def _fail(self, status: int, code: str, message: str) -> None:
        """Refuse what is being received (it never reaches the application): answered after any complete
        requests before it, then the connection closes."""
        self._stop_reading()
        self._queue.append(error_response(status, code, message))
        self._start()

    # --- plumbing ---

    def _transport(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def _write(self, data: bytes) -> None:
        if not self._closing:
            self._transport().write(data)

    def _close(self) -> None:
        if not self._closing:
            self._closing = True
            self._disarm()
            self._transport().close()  # buffered answers are flushed first

    def close_if_idle(self) -> None:
        if self._task is None and not self._queue:
            self._close()

    @property
    def awaiting_request(self) -> bool:
        """Open, answering nothing, and free to send a request (none refused, no Connection: close yet)."""
        return not self._closing and not self._stopped and self._task is None and not self._queue

    def _expect(self, delay: float, on_deadline: Callable[[], None]) -> None:
        self._deadline = deadline = self._loop.time() + delay
        self._on_deadline = on_deadline
        if self._timer is None or self._timer_at > deadline:
            self._disarm()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def _clear_deadline(self) -> None:
        self._deadline = None
        self._on_deadline = self._idle

    def _check_deadline(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._closing:
            return
        if self._loop.time() < deadline:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._check_deadline)
            return
        self._deadline = None
        self._on_deadline()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def socket(self) -> socket.socket | None:
        return self.transport.get_extra_info("socket") if self.transport is not None else None


class Server:
    """Serves ``handler`` on an already bound, listening socket."""

    def __init__(
        self, handler: Handler, limits: Limits, on_protocol_error: Callable[[int], None] = lambda status: None
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.on_protocol_error = on_protocol_error  # for counting answers the application never saw
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None

    def _protocol(self) -> asyncio.Protocol:
        if len(self.connections) >= self.limits.max_connections:
            return _Busy()
        return Connection(self)

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._protocol, sock=sock)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting and drain, within ``timeout`` in all.

        The drain rule: a connection the agent has accepted is owed the reading and answering of one more
        request, if that request arrives within ``limits.drain_grace`` of the stop (a client may connect,
        then take a moment to send). Its answer says ``Connection: close``; requests already being read or
        answered finish as well. Connections still silent after the grace are closed unanswered (nobody
        asked anything). Connections not yet accepted stay queued on the listening socket: with socket
        activation systemd keeps it, and the next agent answers them.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._server is not None:
            self._server.close()
        self.draining = True
        grace_end = min(deadline, loop.time() + self.limits.drain_grace)
        while loop.time() < grace_end and any(c.awaiting_request for c in self.connections):
            await asyncio.sleep(_DRAIN_POLL)
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=max(0.0, deadline - loop.time()))
            for task in late:
                task.cancel()
        for conn in list(self.connections):
            conn._close()  # flushes what was written, then closes
        await asyncio.sleep(0)
        if self._server is not None:
            await self._server.wait_closed()
