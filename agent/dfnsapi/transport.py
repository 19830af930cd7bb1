"""httpx's client API over aiohttp's connection pool, with the error meanings the retry rules depend on.

Why: httpx's own async stack (httpcore over anyio) cost 1.0-1.5 ms of CPU per call here, and its pool
work grows with the number of waiting requests: with 64 concurrent ``/v1/request`` flows the agent spent
15-21 ms of CPU per flow (three calls) and reached 0.2-0.3x the throughput of the official SDK signing
in-process. The same calls through aiohttp's client cost about 0.15 ms each (``python -m bench.flow``
and the figures in the README). The rest of the agent keeps httpx's API (requests, timeouts, responses,
``httpx.MockTransport`` in tests); only the bytes on the wire go through aiohttp.

The one rule that matters for safety: :class:`httpx.ConnectError`/:class:`httpx.ConnectTimeout` mean the
request never left this host (no connection, or none from the pool in time), because the real call is
retried only then (``client.py``). Every other failure after a connection was made is a read error or a
read timeout: the call may have reached Dfns and is never sent again.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

# Headers aiohttp computes from the URL and the body itself; passing httpx's copies too would duplicate them.
_OWN_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding"})


@contextmanager
def _mapped(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as e:  # no connection from the pool, or TCP/TLS connect, in time
        raise httpx.ConnectTimeout(str(e) or "connect timeout", request=request) from e
    except TimeoutError as e:
        # aiohttp's read timeout (ServerTimeoutError/SocketTimeoutError, both TimeoutError): the request was
        # sent. ConnectionTimeoutError is a TimeoutError too, hence the order of these clauses.
        raise httpx.ReadTimeout(str(e) or "read timeout", request=request) from e
    except aiohttp.ClientConnectorError as e:  # DNS, refused, unreachable, TLS handshake: nothing was sent
        raise httpx.ConnectError(str(e), request=request) from e
    except aiohttp.InvalidURL as e:
        raise httpx.UnsupportedProtocol(str(e), request=request) from e
    except (aiohttp.ClientError, OSError) as e:  # disconnects, resets, bad answers: it may have reached Dfns
        raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from e


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (keep-alive pool, no cookie jar) per transport, made in the loop that first uses it.

    Proxies come from ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` as with httpx (looked up once per origin),
    TLS verification from ``SSL_CERT_FILE``/``SSL_CERT_DIR`` or certifi, as httpx does. Cookies are never
    kept, here or in httpx's jar: the session serves every credential's identity."""

    def __init__(self, *, max_connections: int = 100, keepalive_expiry: float = 30.0) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl: ssl.SSLContext = httpx.create_ssl_context(trust_env=True)
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str, int | None], URL | None] = {}

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=self._keepalive_expiry, ssl=self._ssl
            )
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False
            )
        return self._session

    def _proxy_for(self, url: URL) -> URL | None:
        key = (url.scheme, url.host or "", url.port)
        if key not in self._proxies:
            try:
                self._proxies[key] = get_env_proxy_for_url(url)[0]
            except LookupError:  # no proxy for this URL (none set, or NO_PROXY matches)
                self._proxies[key] = None
        return self._proxies[key]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        url = URL(str(request.url), encoded=True)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw if k.lower() not in _OWN_HEADERS
        ]
        body = await request.aread()
        with _mapped(request):
            async with self._session_now().request(
                request.method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                proxy=self._proxy_for(url),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            ) as response:
                # Dfns's answers are small JSON documents: read them whole here, so a failure while reading
                # maps like any other failure after the request was sent.
                content = await response.read()
                status, raw_headers, reason = response.status, response.raw_headers, response.reason
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1"}
        if reason:
            extensions["reason_phrase"] = reason.encode("latin-1", "replace")
        # No Set-Cookie reaches httpx's cookie jar either: one client serves every credential's identity, and
        # Dfns authenticates by bearer token, so a cookie from one answer must never ride on another call.
        headers_back = [(k, v) for k, v in raw_headers if k.lower() != b"set-cookie"]
        return httpx.Response(status, headers=headers_back, content=content, request=request, extensions=extensions)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
