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
503 and are closed. What a connection can make the server hold is bounded too: at most a few pipelined
requests are read ahead (``_MAX_QUEUED``, one read being fed to the parser in pieces), and no answer is
written while the transport's buffer is over its high-water mark (asyncio's write flow control), so a
client that sends and never reads stalls its own connection, no more; one that has not read its answers
within ``idle_timeout`` is cut off (nobody is listening).

Admission comes before any of that: the server accepts on the listening socket itself and asks the
application about each new connection's peer (``SO_PEERCRED``) before it has cost anything. A peer no rule
admits is answered (403) and closed at once, and counts against no limit; an admitted uid holds at most
``max_connections_per_uid`` connections, so that one caller's idle connections cannot lock the others out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import httptools

from agent import jsonio
from agent.caller import Caller
from agent.transport.listener import peer_of
from agent.transport.sender import SenderCheckedTransport, enable_sender_credentials
from agent.transport.share import YIELD_SECONDS, WorkerSlot

log = logging.getLogger(__name__)

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_MAX_QUEUED = 16  # pipelined requests read ahead per connection before reading pauses
_MAX_HEAD = 64 * 1024  # request line and headers; llhttp itself sets no bound
# A read longer than this is fed to the parser in pieces of this size (a piece known to be all body, by its
# Content-Length, is fed whole), and none once _MAX_QUEUED requests are queued: so one read (asyncio's are up
# to 256 KiB) queues at most _MAX_QUEUED + _FEED // 18 requests (18 bytes: "GET / HTTP/1.1\r\n\r\n").
# One request of up to _FEED bytes in one read, the common case, is one feed_data call.
_FEED = 2 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_READ_DRAIN = 64 * 1024
_DRAIN_POLL = 0.005  # how often a drain looks whether every accepted connection has sent its request


@dataclass
class Limits:
    max_body: int = 64 * 1024
    body_timeout: float = 10.0
    idle_timeout: float = 15.0
    max_connections: int = 256
    max_connections_per_uid: int = 128
    drain_grace: float = 0.5  # on stop, how long an accepted connection may still take to send its request


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, jsonio.dumps(data))


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
_UID_BUSY_BYTES = _encode(
    error_response(503, "too_many_connections", "this uid holds as many connections as the agent allows one uid"),
    keep_alive=False,
)
_LINGER = 1.0  # how long a turned-away connection is read (and its bytes dropped) so the client sees the answer
_MAX_LINGERING = 1024  # beyond this many, turned-away connections are closed right after the answer
# Connections accepted per wake-up of the listening socket: one, so that workers sharing the socket share
# the connections. With 64, the worker whose loop woke first took a whole burst (the benchmark's 16
# clients all went to one of two workers, the other served nothing: about half the throughput).
_ACCEPT_BATCH = 1
_ACCEPT_PAUSE = 0.1  # out of file descriptors: wait this long before accepting again


@dataclass(frozen=True)
class Admission:
    """The application's word on a new connection, from its peer's credentials alone."""

    refusal: Response | None = None  # answered at once, then closed; counted against no connection limit
    check_sender: bool = False  # every byte must come from the process that connected (agent/transport/sender.py)


ADMIT_ALL = Admission()
Admit = Callable[[Caller], Admission]


class _Listener:
    """Accepts on the listening socket itself, so that a connection's peer is known before it costs anything.
    ``close()`` and ``wait_closed()`` as asyncio's servers have them. With ``share``, a worker that holds more
    connections than another lets that one take the next (``agent/transport/share.py``)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_accept: Callable[[socket.socket], None],
        share: WorkerSlot | None = None,
    ) -> None:
        self._loop, self._sock, self._on_accept, self._share = loop, sock, on_accept, share
        self._open = True
        self.on_close: Callable[[], None] = lambda: None
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        if self._share is not None and self._share.ahead():
            self._loop.remove_reader(self._sock.fileno())
            self._loop.call_later(YIELD_SECONDS, self._after_yield)
            return
        for _ in range(_ACCEPT_BATCH):
            if not self._accept_one():
                return

    def _after_yield(self) -> None:
        """Take what no other worker took meanwhile (a busy or stuck one must not leave it waiting), then
        listen again."""
        if self._open and self._accept_one(yielded=True):
            self._loop.add_reader(self._sock.fileno(), self._ready)

    def _accept_one(self, *, yielded: bool = False) -> bool:
        """Accept one connection; False when none is waiting, or when accepting paused (then it resumes by
        itself)."""
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return yielded  # after a yield: nothing left to take, listen again
        except OSError as e:
            # Out of file descriptors (or memory): pending connections wait in the backlog meanwhile.
            log.warning("cannot accept connections: %s", e.strerror)
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                if not yielded:
                    self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(_ACCEPT_PAUSE, self._resume)
                return False
            return yielded
        self._on_accept(conn)
        return True

    def _resume(self) -> None:
        if self._open:
            self._loop.add_reader(self._sock.fileno(), self._ready)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self.on_close()

    @property
    def listening(self) -> bool:
        return self._open

    async def wait_closed(self) -> None:
        return None


class _Pending:
    __slots__ = ("method", "url", "headers", "body", "head_done", "head_bytes", "length", "continue_due", "trailing")

    def __init__(self) -> None:
        self.method = ""
        self.url = b""
        self.head_bytes = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.head_done = False
        self.length = 0  # the body's Content-Length, when it has one
        self.continue_due = False  # it asked for a 100 Continue while earlier requests were being answered
        self.trailing = False  # after a chunk's size line and before its data: the trailers, if the last chunk


class Connection(asyncio.Protocol):
    """One client connection: parse, queue complete requests, answer them one at a time, in order."""

    def __init__(self, server: Server, caller: Caller | None = None, *, sender_checked: bool = False) -> None:
        self.server = server
        self.limits = server.limits
        self.caller = caller  # the peer as admitted at accept
        self.transport: asyncio.Transport | None = None
        self.context: dict[str, Any] = {}  # the application's per-connection cache (e.g. the peer's identity)
        if caller is not None:
            self.context["caller"] = caller
        self.context["sender_checked"] = sender_checked
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
        self._lost = False
        self._stopped = False  # no further request is read (Connection: close, EOF, error)
        self._paused = False  # reading paused: _MAX_QUEUED requests were queued
        # The rest of a read, held while reading is paused (so no later byte, nor EOF, arrives before it is fed).
        self._unfed: memoryview | None = None
        self._write_paused = False  # the transport's buffer is over its high-water mark: the client is not reading
        self._writable: asyncio.Future[None] | None = None  # the answer loop waits on it while writing is paused
        self._cutoff: asyncio.TimerHandle | None = None  # closing, with answers the client has not read yet

    # --- transport events ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self._expect(self.limits.idle_timeout, self._idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = self._lost = True
        self._disarm()
        self.server.connections.discard(self)
        self.server.release(self.caller)
        self._queue.clear()  # an answer in progress still finishes (and is audited); nobody reads it
        self._unfed = None
        self.resume_writing()  # an answer loop waiting to write ends

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._writable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if len(data) <= _FEED:
            self._feed(data)
        else:
            self._feed_pieces(memoryview(data))

    def _feed_pieces(self, data: memoryview) -> None:
        """Feed ``data`` piece by piece; once ``_MAX_QUEUED`` requests are queued (reading is paused then),
        keep the rest until the queue has drained."""
        start, end = 0, len(data)
        while start < end and not self._stopped:
            if len(self._queue) >= _MAX_QUEUED:
                self._unfed = data[start:]
                return
            step = _FEED
            pending = self._current
            if pending is not None and pending.head_done and pending.length > self._size:
                step = pending.length - self._size  # all body: it completes no request but this one
            if not self._feed(data[start : start + step]):
                return
            start += step

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse ``data``; False when nothing more is to be parsed."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol upgrades here: answer what was complete (if anything), then close.
            if self._task is None and not self._queue:
                self._fail(400, "invalid_request", "protocol upgrades are not supported")
            else:
                self._stop_reading()
            return False
        except httptools.HttpParserError as e:
            if not self._stopped:  # (after "Connection: close" anything more is an error, and ignored)
                log.debug("malformed request: %s", e)
                self._fail(400, "invalid_request", "malformed HTTP request")
            return False
        pending = self._current
        if pending is None:
            return not self._closing
        if not pending.head_done or pending.trailing:
            # (Trailers after a chunked body are bounded as a head is: httptools holds a header not yet ended.)
            # Counted from the start of the piece the head began in, so with up to one piece (_FEED) of what
            # came before it: the bound allows for that, so that no head within _MAX_HEAD is refused, and a
            # head that never ends is refused within _MAX_HEAD + _FEED bytes. (A head parsed whole is bounded
            # exactly, by _count_head.)
            self._head_size += len(data)
            if self._head_size > _MAX_HEAD + _FEED:
                self._fail(431, "headers_too_large", f"request line and headers exceed {_MAX_HEAD} bytes")
                return False
        if pending.head_done and not self._paused and self._on_deadline != self._body_late:
            # The body straddles reads. (While reading is paused the rest may be ours to feed, or not read
            # yet: its deadline is set once the queue has drained.)
            self._expect(self.limits.body_timeout, self._body_late)
        return not self._closing

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
            self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._current is not None:
            self._current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
            self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        """The head's size as the parser hands it over: however it arrives, one write or many, it is bounded
        (``data_received`` bounds a head that has not completed yet; this one, a head parsed at once)."""
        pending = self._current
        if pending is not None:
            pending.head_bytes += size
            if pending.head_bytes > _MAX_HEAD:
                self._fail(431, "headers_too_large", f"request line and headers exceed {_MAX_HEAD} bytes")

    def on_headers_complete(self) -> None:
        pending = self._current
        if pending is None:
            return
        pending.head_done = True
        pending.method = self._parser.get_method().decode("latin-1")
        length = pending.headers.get("content-length")
        if length is not None and length.isdigit():
            pending.length = int(length)
            if pending.length > self.limits.max_body:
                self._too_large()
                return
        if pending.headers.get("expect", "").lower() == "100-continue":
            if self._task is None and not self._queue:
                self._write(_CONTINUE)
            else:  # never ahead of the answers before it: sent when it is next, unless its body has begun
                pending.continue_due = True

    def on_chunk_header(self) -> None:
        """A chunk's size line ended: its data follows, or, after the last (empty) chunk, the trailers."""
        if self._current is not None:
            self._current.trailing = True
            self._head_size = 0

    def on_body(self, body: bytes) -> None:
        if self._current is None:
            return
        self._current.trailing = False
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
            while True:
                if self._write_paused and not await self._client_read():
                    return
                if not self._queue:
                    break
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
                    self._read_on()
            if self._stopped:
                self._close()
            elif (pending := self._current) is not None and pending.head_done:
                self._expect(self.limits.body_timeout, self._body_late)
                if pending.continue_due and not self._size:
                    self._write(_CONTINUE)  # its turn now, and its body has not begun
            else:  # the next request's head (or the rest of it) is due within the idle timeout
                self._expect(self.limits.idle_timeout, self._idle)
        finally:
            if self._task is not None:
                self.server.tasks.discard(self._task)
            self._task = None

    def _read_on(self) -> None:
        """The queue has drained: parse the rest of the last read, then read again (unless that rest filled
        the queue once more)."""
        self._paused = False
        rest, self._unfed = self._unfed, None
        if rest is not None:
            self._feed_pieces(rest)
        if not self._paused and not self._closing:
            self._transport().resume_reading()

    async def _client_read(self) -> bool:
        """Writing is paused (the client is not reading its answers): wait until it resumes, at most
        ``idle_timeout``. A client that has read nothing for that long is not listening, and is cut off
        (aborted: a close would wait for its answers to be flushed, forever). False: the connection ended."""
        waiter = self._writable = self._loop.create_future()
        timer = self._loop.call_later(self.limits.idle_timeout, self._abort)
        try:
            await waiter
        finally:
            timer.cancel()
            self._writable = None
        return not self._closing

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

    def refuse_sender(self, pid: int) -> None:
        """Bytes came from a process other than the one that connected (see agent/transport/sender.py)."""
        log.warning("a connection of %s carried bytes written by pid %d; closing it", self.caller, pid)
        self._fail(
            403, "sender_changed", "bytes on this connection came from another process than the one that opened it"
        )

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
            transport = self._transport()
            transport.close()  # buffered answers are flushed first, if the client reads them:
            if transport.get_write_buffer_size():  # a client that does not is cut off after idle_timeout
                self._cutoff = self._loop.call_later(self.limits.idle_timeout, self._abort)

    def _abort(self) -> None:
        """Close at once, dropping what the client has not read."""
        if self._lost:
            return
        log.debug("a client did not read its answers within %gs; closing its connection", self.limits.idle_timeout)
        self._closing = True
        self._disarm()
        self.resume_writing()
        self._transport().abort()

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
        if self._cutoff is not None:
            self._cutoff.cancel()
            self._cutoff = None

    @property
    def socket(self) -> socket.socket | None:
        return self.transport.get_extra_info("socket") if self.transport is not None else None


class Server:
    """Serves ``handler`` on an already bound, listening socket."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        on_protocol_error: Callable[[int], None] = lambda status: None,
        admit: Admit = lambda caller: ADMIT_ALL,
        share: WorkerSlot | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.on_protocol_error = on_protocol_error  # for counting answers the application never saw
        self.admit = admit  # the application's word on a new connection's peer
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self._server: _Listener | None = None
        self._per_uid: dict[int, int] = {}  # admitted connections (open or opening) by the peer's uid
        self._opening = 0  # admitted connections whose transport is still being made
        self._admitted = 0  # admitted connections (open or opening), as published to the other workers
        self._share = share
        self._lingering: dict[socket.socket, asyncio.TimerHandle] = {}

    async def start(self, sock: socket.socket) -> None:
        enable_sender_credentials(sock)  # before the first connection: even bytes sent before accept carry it
        sock.setblocking(False)
        if self._share is not None:
            self._share.publish(0)
        self._server = _Listener(asyncio.get_running_loop(), sock, self._accepted, self._share)
        self._server.on_close = self._closed

    # --- admission (before the connection costs anything) ---

    def _accepted(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            caller = peer_of(conn)
            admission = self.admit(caller)
        except Exception:  # noqa: BLE001 - a peer we cannot identify is not served
            log.exception("cannot identify a new connection's peer")
            conn.close()
            return
        if admission.refusal is not None:
            self._turn_away(conn, _encode(admission.refusal, keep_alive=False))
            return
        if self._per_uid.get(caller.uid, 0) >= self.limits.max_connections_per_uid:
            self._turn_away(conn, _UID_BUSY_BYTES)
            return
        if len(self.connections) + self._opening >= self.limits.max_connections:
            self._turn_away(conn, _BUSY_BYTES)
            return
        self._per_uid[caller.uid] = self._per_uid.get(caller.uid, 0) + 1
        self._count(+1)
        loop = asyncio.get_running_loop()
        connection = Connection(self, caller, sender_checked=admission.check_sender)
        if admission.check_sender:
            SenderCheckedTransport(loop, conn, connection, caller.pid, connection.refuse_sender)
            return
        self._opening += 1
        task = loop.create_task(self._open(conn, connection, caller))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, conn: socket.socket, connection: Connection, caller: Caller) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: connection, conn)
        except OSError:
            conn.close()
            self.release(caller)
        finally:
            self._opening -= 1

    def release(self, caller: Caller | None) -> None:
        """An admitted connection ended: its uid may open another."""
        if caller is not None:
            left = self._per_uid.get(caller.uid, 0) - 1
            if left > 0:
                self._per_uid[caller.uid] = left
            else:
                self._per_uid.pop(caller.uid, None)
            self._count(-1)

    def _count(self, change: int) -> None:
        self._admitted += change
        if self._share is not None and self._server is not None and self._server.listening:
            self._share.publish(self._admitted)

    def _closed(self) -> None:
        """The listener closed (a stop): no other worker waits for this one to take connections any more."""
        if self._share is not None:
            self._share.leave()
        self._close_lingering()

    def _turn_away(self, conn: socket.socket, answer: bytes) -> None:
        """Answer at once and close. The client's request (if it sent one yet) is read and dropped for a
        moment so that it sees the answer rather than a broken pipe; the number of such connections is
        bounded, and none of them counts against the connection limits."""
        try:
            conn.send(answer)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if len(self._lingering) >= _MAX_LINGERING:
            conn.close()
            return
        loop = asyncio.get_running_loop()

        def done() -> None:
            timer = self._lingering.pop(conn, None)
            if timer is not None:
                timer.cancel()
                loop.remove_reader(conn.fileno())
                conn.close()

        def drain() -> None:
            try:
                while conn.recv(_READ_DRAIN):
                    pass
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            done()  # end of file (or an error): the client has seen the answer

        self._lingering[conn] = loop.call_later(_LINGER, done)
        loop.add_reader(conn.fileno(), drain)

    def _close_lingering(self) -> None:
        loop = asyncio.get_running_loop()
        for conn, timer in list(self._lingering.items()):
            timer.cancel()
            loop.remove_reader(conn.fileno())
            conn.close()
        self._lingering.clear()

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
        # Accepted but still being opened (connect_accepted_socket): not yet in self.connections, owed the same.
        while loop.time() < grace_end and (self._opening or any(c.awaiting_request for c in self.connections)):
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
