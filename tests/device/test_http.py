"""The agent's own HTTP/1.1 layer (agent/http.py), spoken to byte by byte over a real agent's socket.

What ordinary clients rely on besides the happy path: keep-alive, pipelined requests answered in order,
chunked bodies, ``Expect: 100-continue`` (curl sends it for large bodies), HTTP/1.0, HEAD without a body,
and limits enforced per connection without disturbing the others.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dev.testing import (
    AgentProcess,
    check_assertion,
    connect_raw,
    cred_id_for,
    key_label,
    make_challenge,
    make_token_env,
    running_agent,
)


@pytest.fixture(scope="module")
def agent(template_token: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    te = make_token_env(template_token, tmp_path_factory.mktemp("http") / "hsm")
    te.write_config(server="idle_timeout = 2.0\nbody_timeout = 1.0\n")
    with running_agent(te) as a:
        yield a
    assert "Traceback" not in a.output(), a.output()[-3000:]


@pytest.fixture(scope="module")
def pems(template_keys: dict[str, str]) -> dict[str, str]:
    return template_keys


class Conn:
    """A raw connection that reads whole HTTP/1.1 responses (Content-Length framed)."""

    def __init__(self, agent: AgentProcess) -> None:
        self.s = connect_raw(agent.socket_path)
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.s.close()

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def _fill(self) -> bool:
        data = self.s.recv(65536)
        self.buf += data
        return bool(data)

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a full response: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = 0 if head_only or status in (100, 204) else int(headers["content-length"])
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self) -> bool:
        try:
            return self.buf == b"" and not self._fill()
        except ConnectionResetError:
            return True


def sign_request(kind: str, *, extra_headers: bytes = b"", close: bool = False) -> tuple[bytes, dict[str, object]]:
    challenge = make_challenge(cred_id_for(kind))
    body = json.dumps({"challenge": challenge, "credential": kind}).encode()
    head = b"POST /v1/sign HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n" % len(body) + extra_headers
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body, challenge


def test_keep_alive_serves_many_requests_on_one_connection(agent: AgentProcess, pems: dict[str, str]) -> None:
    with Conn(agent) as c:
        for _ in range(5):
            request, challenge = sign_request("p256")
            c.send(request)
            status, headers, body = c.response()
            assert status == 200 and "connection" not in headers
            check_assertion(json.loads(body), challenge, pems[key_label("p256")], cred_id_for("p256"))


def test_pipelined_requests_are_answered_in_order(agent: AgentProcess, pems: dict[str, str]) -> None:
    with Conn(agent) as c:
        kinds = ["ed25519", "p256", "ed25519", "secp256k1"] * 3
        requests = [sign_request(k) for k in kinds]
        c.send(b"".join(r for r, _ in requests) + b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
        for kind, (_, challenge) in zip(kinds, requests, strict=True):
            status, _, body = c.response()
            assert status == 200, body
            check_assertion(json.loads(body), challenge, pems[key_label(kind)], cred_id_for(kind))
        status, _, body = c.response()
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_connection_close_is_honoured_and_nothing_after_it_is_read(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        request, _ = sign_request("ed25519", close=True)
        c.send(request + b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = c.response()
        assert status == 200 and headers["connection"] == "close"
        assert c.closed()


def test_http_1_0_gets_one_answer_then_close(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        c.send(b"GET /v1/health HTTP/1.0\r\n\r\n")
        status, headers, body = c.response()
        assert status == 200 and json.loads(body)["status"] == "ok" and headers["connection"] == "close"
        assert c.closed()


def test_chunked_body_is_reassembled(agent: AgentProcess, pems: dict[str, str]) -> None:
    challenge = make_challenge(cred_id_for("p256"))
    body = json.dumps({"challenge": challenge, "credential": "p256"}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
    with Conn(agent) as c:
        c.send(b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        status, _, answer = c.response()
        assert status == 200, answer
        check_assertion(json.loads(answer), challenge, pems[key_label("p256")], cred_id_for("p256"))


def test_chunked_body_over_the_limit_is_413(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        try:
            c.send(b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"a" * 8192
            for _ in range(9):  # 72 KiB > the 64 KiB default
                c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            status, headers, body = c.response()
        except (BrokenPipeError, ConnectionResetError):
            pytest.fail("the agent closed the connection without answering 413")
        assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
        assert headers["connection"] == "close"
    assert agent.http.get("/v1/health").status_code == 200


def test_expect_100_continue_gets_an_interim_answer(agent: AgentProcess, pems: dict[str, str]) -> None:
    request, challenge = sign_request("ed25519", extra_headers=b"Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    with Conn(agent) as c:
        c.send(head + b"\r\n\r\n")
        status, _, _ = c.response()
        assert status == 100
        c.send(body)
        status, _, answer = c.response()
        assert status == 200
        check_assertion(json.loads(answer), challenge, pems[key_label("ed25519")], cred_id_for("ed25519"))


def test_expect_100_continue_with_a_body_over_the_limit_is_413_at_once(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        c.send(b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
        status, _, body = c.response()
        assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"


def test_head_gets_headers_but_no_body(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        c.send(b"HEAD /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = c.response(head_only=True)
        assert status == 405 and int(headers["content-length"]) > 0
        c.send(b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")  # the stream is still in step
        status, _, body = c.response()
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_malformed_request_line_is_400_json_and_closes(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        c.send(b"THIS IS NOT HTTP\r\n\r\n")
        status, headers, body = c.response()
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_request"
        assert headers["connection"] == "close" and c.closed()


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        c.send(b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
        assert c.response()[0] == 200
        started = time.monotonic()
        assert c.closed()  # blocks until the agent closes it (idle_timeout = 2 s here)
        assert 1.0 < time.monotonic() - started < 4.5


def test_a_stalled_body_is_408_while_other_connections_are_served(agent: AgentProcess) -> None:
    with Conn(agent) as stalled, Conn(agent) as other:
        stalled.send(b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\n{")
        for _ in range(3):
            request, _ = sign_request("p256")
            other.send(request)
            assert other.response()[0] == 200
        status, _, body = stalled.response()
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"


def test_limits_apply_to_every_request_of_a_kept_alive_connection(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        for _ in range(2):  # the second time, the stalled body follows a request that completed
            request, _ = sign_request("p256")
            c.send(request)
            assert c.response()[0] == 200
        c.send(b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\n{")
        status, _, body = c.response()
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    with Conn(agent) as c:
        c.send(b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\nGET /v1/hea")  # an answer, then half a head
        assert c.response()[0] == 200
        started = time.monotonic()
        assert c.closed()
        assert time.monotonic() - started < 4.5


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/health HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT agent:80 HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_protocol_upgrades_get_an_answer_and_a_close(agent: AgentProcess, request_bytes: bytes) -> None:
    with Conn(agent) as c:
        c.send(request_bytes)
        status, headers, _ = c.response()
        assert 200 <= status < 500 and headers["connection"] == "close"
        assert c.closed()


def test_an_endless_head_is_431_and_the_connection_closes(agent: AgentProcess) -> None:
    with Conn(agent) as c:
        c.send(b"GET /v1/health HTTP/1.1\r\nHost: a\r\nX-Pad: ")
        try:
            for _ in range(40):  # 80 KiB of one header value, never finished
                c.send(b"a" * 2048)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed after answering; the answer is still readable
        status, headers, body = c.response()
        assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"
        assert headers["connection"] == "close"
    assert agent.http.get("/v1/health").status_code == 200


def test_a_handler_that_fails_unexpectedly_gets_a_logged_500_and_the_connection_goes_on(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's last resort (the agent's App maps its own errors the same way, with the same helper)."""
    from agent.transport.http import Limits, Request, Response, Server, json_response

    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return json_response({"ok": True})

    async def exchange() -> bytes:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(short_dir / "s.sock"))
        sock.listen()
        server = Server(handler, Limits())
        await server.start(sock)
        reader, writer = await asyncio.open_unix_connection(str(short_dir / "s.sock"))
        writer.write(b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\nGET /fine HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await server.shutdown(1.0)
        return answer

    answer = asyncio.run(exchange())
    first, _, second = answer.partition(b"HTTP/1.1 200")
    assert first.startswith(b"HTTP/1.1 500")
    assert json.loads(first.partition(b"\r\n\r\n")[2])["error"]["code"] == "internal_error"
    assert b"a bug" not in answer and json.loads(second.partition(b"\r\n\r\n")[2]) == {"ok": True}
    assert any("unexpected error in GET /boom" in r.getMessage() and r.exc_info for r in caplog.records)
