"""The bytes to and from Dfns: one request in, one whole answer out, over aiohttp's connection pool, with the
failure meanings the retry rules depend on.

Why aiohttp, called directly: httpx's own async stack (httpcore over anyio) cost 1.0-1.5 ms of CPU per call
here and grew with the number of waiting requests (15-21 ms per flow at 64 concurrent flows). Keeping
httpx's client API over aiohttp's pool still cost about 0.55 ms per call in the daemon (request and URL
building, ``Response`` objects, its cookie jar on every answer: 12 % of a worker's samples under py-spy), so
the three calls of a flow now go straight to aiohttp, which costs about 0.15 ms each.

The one rule that matters for safety: :attr:`Failure.sent` is false only when the request never left this host
(no connection, or none from the pool in time), because the real call is retried only then (``client.py``).
Every failure after a connection was made may have reached Dfns, and such a call is never sent again: not by
the agent, and not by aiohttp either, which on its own resends a PUT or DELETE once when a pooled
connection drops (RFC 9112 calls them idempotent; with a single-use user action they are not). Only a
GET, HEAD or OPTIONS, which carry no user action, is resent here once on such a drop.

Bounds: a call takes at most :attr:`Timeouts.total` in all (a server trickling bytes cannot hold a worker's
request), and an answer is read up to :attr:`HttpRequest.max_answer` bytes (decoded), never buffered whole
whatever its size.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL


class Failure(Enum):
    """Why no answer came, in the terms the retry rules need."""

    CONNECT = "connect"  # no connection: DNS, refused, unreachable, TLS handshake, proxy, bad URL
    CONNECT_TIMEOUT = "connect_timeout"  # no connection (TCP/TLS, or a free one from the pool) in time
    BROKEN = "broken"  # the connection failed after the request may have been sent: reset, cut-off answer
    TIMEOUT = "timeout"  # the request was sent and no (whole) answer came in time
    TOO_LARGE = "too_large"  # Dfns answered (``TransportError.status``) with more than the request's bound

    @property
    def sent(self) -> bool:
        """Whether the request may have reached Dfns."""
        return self in (Failure.BROKEN, Failure.TIMEOUT, Failure.TOO_LARGE)

    @property
    def timed_out(self) -> bool:
        return self in (Failure.CONNECT_TIMEOUT, Failure.TIMEOUT)


class TransportError(Exception):
    """A request that got no answer; the message is the cause (it never holds a header or the body)."""

    def __init__(self, failure: Failure, detail: str, status: int | None = None) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.status = status  # the answer's status, where one came (TOO_LARGE)


@dataclass(frozen=True)
class Timeouts:
    """Seconds for a connection to come up, for a free connection from the pool, between bytes read, and for
    the whole call (from asking the pool to the answer's last byte)."""

    connect: float
    pool: float
    read: float
    total: float


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str  # absolute and already encoded: sent as given, never normalised (see flow.check_path)
    headers: Mapping[str, str]
    content: bytes | None
    timeouts: Timeouts
    max_answer: int = 1 << 20  # bytes of decoded answer body read at most; more is Failure.TOO_LARGE


@dataclass(frozen=True)
class HttpAnswer:
    """A whole answer: header names in lower case (repeated ones joined by ``", "``), no ``Set-Cookie``, the
    body decoded of its content encoding."""

    status: int
    headers: Mapping[str, str]
    content: bytes


class HttpTransport(Protocol):
    """What :class:`~agent.dfnsapi.client.DfnsApi` sends through: one request, one answer or a
    :class:`TransportError`."""

    async def send(self, request: HttpRequest) -> HttpAnswer: ...


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except TransportError:
        raise
    except aiohttp.ConnectionTimeoutError as e:  # no connection from the pool, or TCP/TLS connect, in time
        raise TransportError(Failure.CONNECT_TIMEOUT, str(e) or "connect timeout") from e
    except TimeoutError as e:
        # aiohttp's read timeout (ServerTimeoutError/SocketTimeoutError, both TimeoutError): the request was
        # sent. ConnectionTimeoutError is a TimeoutError too, hence the order of these clauses.
        raise TransportError(Failure.TIMEOUT, str(e) or "read timeout") from e
    except aiohttp.ClientConnectorError as e:  # DNS, refused, unreachable, TLS handshake: nothing was sent
        raise TransportError(Failure.CONNECT, f"{type(e).__name__}: {e}") from e
    except aiohttp.InvalidURL as e:  # nothing was sent
        raise TransportError(Failure.CONNECT, f"{type(e).__name__}: {e}") from e
    except (aiohttp.ClientError, OSError) as e:  # disconnects, resets, bad answers: it may have reached Dfns
        raise TransportError(Failure.BROKEN, f"{type(e).__name__}: {e}") from e


_RESENT_ON_A_DROP = frozenset({"GET", "HEAD", "OPTIONS"})  # no user action rides on these
_CHUNK = 64 * 1024


async def _bounded_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The decoded body, read in chunks and given up past ``limit`` bytes (the connection is then dropped,
    not returned to the pool: the rest of the answer is never read)."""
    declared = response.content_length
    if declared is not None and declared > limit and not response.headers.get("Content-Encoding"):
        raise TransportError(Failure.TOO_LARGE, f"{declared} bytes declared, over {limit}", response.status)
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise TransportError(Failure.TOO_LARGE, f"over {limit} bytes", response.status)
        parts.append(chunk)
    return b"".join(parts)


def _answer_headers(raw: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for k, v in raw:
        name = k.decode("latin-1").lower()
        if name == "set-cookie":
            continue
        value = v.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class AiohttpTransport:
    """One aiohttp session (keep-alive pool, no cookie jar) per transport, made in the loop that first uses it.

    Proxies come from ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (looked up once per origin), TLS
    verification from ``SSL_CERT_FILE``/``SSL_CERT_DIR`` or certifi, as httpx reads them. Cookies are never
    kept: the session serves every credential's identity, and Dfns authenticates by bearer token, so a cookie
    from one answer must never ride on another call."""

    def __init__(self, *, user_agent: str, max_connections: int = 100, keepalive_expiry: float = 30.0) -> None:
        self._user_agent = user_agent
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl: ssl.SSLContext = httpx.create_ssl_context(trust_env=True)
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str, int | None], URL | None] = {}
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    async def __aenter__(self) -> AiohttpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=self._keepalive_expiry, ssl=self._ssl
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self._user_agent},
                trust_env=False,  # read here instead: the proxy once per origin, TLS settings at start
            )
            # aiohttp resends a PUT or DELETE once if a pooled connection drops; that would send a single-use
            # user action twice (``send`` resends only GET, HEAD and OPTIONS). No public switch exists:
            # tests/unit/test_dfns_transport.py counts what a dropped PUT sends, so a rename cannot go unseen.
            self._session._retry_connection = False
        return self._session

    def _proxy_for(self, url: URL) -> URL | None:
        key = (url.scheme, url.host or "", url.port)
        if key not in self._proxies:
            try:
                self._proxies[key] = get_env_proxy_for_url(url)[0]
            except LookupError:  # no proxy for this URL (none set, or NO_PROXY matches)
                self._proxies[key] = None
        return self._proxies[key]

    def _timeout(self, t: Timeouts) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(t)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(total=t.total, connect=t.pool, sock_connect=t.connect, sock_read=t.read)
            self._timeouts[t] = timeout
        return timeout

    async def send(self, request: HttpRequest) -> HttpAnswer:
        if request.method in _RESENT_ON_A_DROP:
            try:
                return await self._send_once(request)
            except TransportError as e:
                dropped = isinstance(e.__cause__, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))
                if e.failure is not Failure.BROKEN or not dropped:
                    raise
        return await self._send_once(request)

    async def _send_once(self, request: HttpRequest) -> HttpAnswer:
        with _mapped():
            url = URL(request.url, encoded=True)
            async with self._session_now().request(
                request.method,
                url,
                headers=request.headers,
                data=request.content,
                allow_redirects=False,
                proxy=self._proxy_for(url),
                timeout=self._timeout(request.timeouts),
            ) as response:
                # Read whole here (within the bound), so a failure while reading maps like any other failure
                # after the request was sent.
                content = await _bounded_body(response, request.max_answer)
                return HttpAnswer(response.status, _answer_headers(response.raw_headers), content)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
