"""The Dfns client's transport (aiohttp's pool) against real sockets on loopback.

What the retry rules rest on: a failure counts as not sent (``CONNECT``/``CONNECT_TIMEOUT``) only when
nothing left this host; a failure after the request was sent is ``BROKEN`` or ``TIMEOUT``, so a real call
is never sent twice. Also: bodies and headers go out as given, answers come back decoded, no cookie is
kept between identities, and the proxy and the trust store come from the environment as with httpx.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.dfnsapi.transport import AiohttpTransport, Failure, HttpAnswer, HttpRequest, Timeouts, TransportError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (the suite has no async plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0].encode(), headers, body


WAIT = Timeouts(connect=5.0, pool=30.0, read=30.0, total=60.0)


def client(max_connections: int = 100) -> AiohttpTransport:
    return AiohttpTransport(user_agent="dfns-agent/test", max_connections=max_connections)


async def post(
    http: AiohttpTransport, url: str, content: bytes = b"{}", headers: dict[str, str] | None = None,
    timeouts: Timeouts = WAIT,
) -> HttpAnswer:  # fmt: skip
    return await http.send(HttpRequest("POST", url, headers or {}, content, timeouts))


async def get(http: AiohttpTransport, url: str) -> HttpAnswer:
    return await http.send(HttpRequest("GET", url, {}, None, WAIT))


@contextmanager
def fails_with(failure: Failure) -> Iterator[None]:
    with pytest.raises(TransportError) as e:
        yield
    assert e.value.failure is failure, e.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@in_loop
async def test_a_refused_connection_is_a_connect_error() -> None:
    async with client() as http:
        with fails_with(Failure.CONNECT):
            await post(http, f"http://127.0.0.1:{free_port()}/wallets")


@in_loop
async def test_a_server_that_closes_after_reading_the_request_is_broken_not_unsent() -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, body = await read_head(reader)
        got.append(body)
        writer.close()  # the request reached the server; no answer

    async with serving(handler) as url, client() as http:
        with fails_with(Failure.BROKEN):
            await post(http, url + "/wallets", b'{"n":1}')
    assert Failure.BROKEN.sent
    assert got == [b'{"n":1}']


@in_loop
async def test_an_answer_cut_off_in_its_body_is_broken() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial":')
        await writer.drain()
        writer.close()

    async with serving(handler) as url, client() as http:
        with fails_with(Failure.BROKEN):
            await post(http, url + "/wallets")


@in_loop
async def test_a_server_that_never_answers_is_a_timeout_after_sending() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await release.wait()
        writer.close()

    async with serving(handler) as url, client() as http:
        with fails_with(Failure.TIMEOUT):
            await post(http, url + "/wallets", timeouts=Timeouts(connect=5.0, pool=5.0, read=0.3, total=60.0))
        assert Failure.TIMEOUT.sent
        release.set()


@in_loop
async def test_no_connection_from_the_pool_in_time_is_a_connect_timeout_before_sending() -> None:
    release = asyncio.Event()
    first_in = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        first_in.set()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async with serving(handler) as url, client(max_connections=1) as http:
        busy = asyncio.create_task(post(http, url + "/a"))
        await first_in.wait()  # the pool's one connection is taken
        with fails_with(Failure.CONNECT_TIMEOUT):
            await post(http, url + "/b", timeouts=Timeouts(connect=30.0, pool=0.3, read=30.0, total=60.0))
        assert not Failure.CONNECT_TIMEOUT.sent
        release.set()
        assert (await busy).status == 200


@in_loop
async def test_request_and_answer_pass_as_given_and_no_cookie_is_kept() -> None:
    seen: list[tuple[bytes, dict[str, str], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await read_head(reader))
            except asyncio.IncompleteReadError:
                break
            body = gzip.compress(b'{"id":"wa-1"}')
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                         b"Set-Cookie: s=secret; Path=/\r\nX-Other: 1\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
            await writer.drain()
        writer.close()

    payload = b'{"network":"Ethereum","name":"tr\xc3\xa9sor"}'
    async with serving(handler) as url, client() as http:
        for _ in range(2):
            r = await post(http, url + "/wallets?x=1", payload, {"Authorization": "Bearer t", "X-DFNS-USERACTION": "u"})
            assert r.status == 201 and json.loads(r.content) == {"id": "wa-1"} and r.headers["x-other"] == "1"
            assert "set-cookie" not in r.headers
    (line, headers, body), (_, again, _) = seen
    assert line == b"POST /wallets?x=1 HTTP/1.1" and body == payload
    assert headers["authorization"] == "Bearer t" and headers["x-dfns-useraction"] == "u"
    assert headers["content-length"] == str(len(payload)) and headers["host"].startswith("127.0.0.1:")
    assert headers["user-agent"] == "dfns-agent/test"
    assert "cookie" not in again  # the Set-Cookie of the first answer is not sent back


@in_loop
async def test_the_proxy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_head(reader)
        lines.append(line)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    async with serving(proxy) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("NO_PROXY", "direct.invalid")
        async with client() as http:
            r = await get(http, "http://dfns.invalid/wallets")
            assert r.status == 204
            with fails_with(Failure.CONNECT):  # NO_PROXY: tried directly, and the name does not resolve
                await get(http, "http://direct.invalid/wallets")
    assert lines == [b"GET http://dfns.invalid/wallets HTTP/1.1"]


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@in_loop
async def test_tls_is_verified_against_ssl_cert_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_head(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/wallets"
    try:
        async with client() as http:  # the default trust store does not know this certificate
            with fails_with(Failure.CONNECT):
                await get(http, url)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
        async with client() as http:
            r = await get(http, url)
            assert r.status == 200 and json.loads(r.content) == {}
    finally:
        server.close()
        await server.wait_closed()


def drop_first_then_answer(got: list[bytes]) -> Handler:
    """Reads each request; the first connection is closed without an answer, later ones answer 200."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_head(reader)
        got.append(line)
        if len(got) > 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    return handler


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST", "PATCH"])
@in_loop
async def test_a_mutation_whose_connection_drops_is_sent_once(method: str) -> None:
    # aiohttp on its own resends a PUT or DELETE once after such a drop, with the same single-use user action.
    got: list[bytes] = []
    async with serving(drop_first_then_answer(got)) as url, client() as http:
        with fails_with(Failure.BROKEN):
            await http.send(HttpRequest(method, url + "/auth/service-accounts/sa-1/deactivate", {}, b"{}", WAIT))
    assert len(got) == 1, got


@in_loop
async def test_a_get_whose_connection_drops_is_sent_again_once() -> None:
    got: list[bytes] = []
    async with serving(drop_first_then_answer(got)) as url, client() as http:
        assert (await get(http, url + "/wallets")).status == 200
    assert got == [b"GET /wallets HTTP/1.1"] * 2


@in_loop
async def test_an_answer_trickling_in_is_cut_off_at_the_total_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):  # one byte every 50 ms: each gap is well inside the read timeout
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    async with serving(handler) as url, client() as http:
        with fails_with(Failure.TIMEOUT):
            await post(http, url + "/wallets", timeouts=Timeouts(connect=5.0, pool=5.0, read=5.0, total=0.5))


def answering(head: bytes, body: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(head + body)
        await writer.drain()
        writer.close()

    return handler


LIMIT = 64 * 1024
BIG = b"[" + b"1," * LIMIT + b"1]"


@pytest.mark.parametrize(
    ("head", "body"),
    [
        (f"HTTP/1.1 200 OK\r\nContent-Length: {len(BIG)}\r\n\r\n".encode(), BIG),  # declared
        (b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\n", BIG),  # not declared: read to the end
        (
            f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(gzip.compress(BIG))}\r\n\r\n".encode(),
            gzip.compress(BIG),  # small on the wire, large decoded
        ),
    ],
)
@in_loop
async def test_an_answer_over_the_bound_is_too_large_with_its_status(head: bytes, body: bytes) -> None:
    async with serving(answering(head, body)) as url, client() as http:
        with pytest.raises(TransportError) as e:
            await http.send(HttpRequest("POST", url + "/wallets", {}, b"{}", WAIT, max_answer=LIMIT))
    assert e.value.failure is Failure.TOO_LARGE and Failure.TOO_LARGE.sent
    assert e.value.status == int(head.split()[1])


@in_loop
async def test_an_answer_at_the_bound_is_read_whole() -> None:
    body = BIG[:LIMIT]
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    async with serving(answering(head, body)) as url, client() as http:
        answer = await http.send(HttpRequest("POST", url + "/wallets", {}, b"{}", WAIT, max_answer=LIMIT))
    assert answer.content == body
