"""The agent's own client (``agent/client.py``) against a real HTTP server on a real Unix socket.

What it must get right besides the bytes: it keeps one connection alive across calls, never sends a request
on a connection the agent has closed (it opens a new one), never sends a request twice (a connection that
dies during a call is ``agent_no_answer``, and the agent saw the request once), it tells a request that never
reached the agent (``agent_unreachable``: safe to resend) from one that got no answer (``agent_no_answer``:
it may still be carried out), it waits for a Dfns flow longer than for a signature, and it can be shared by
threads. The client against the agent itself is in ``tests/device/`` (CLI, SDK, flow).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingUnixStreamServer

import pytest

from agent.client import NO_ANSWER, UNREACHABLE, AgentClient, AgentClientError

Behaviour = Callable[["Handler", dict[str, object]], None]


@dataclass
class Seen:
    connections: int = 0
    closed: int = 0
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def wait_closed(self, n: int) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: self.closed >= n, timeout=30), f"{self.closed} of {n} closed"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the agent's server
    server: AgentLike

    def setup(self) -> None:
        super().setup()
        with self.server.seen.lock:
            self.server.seen.connections += 1

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.seen.lock:
            self.server.seen.requests.append((self.command, self.path, body))
        self.server.behaviour(self, json.loads(body) if body else {})

    do_GET = do_POST = _serve

    def answer(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
        content = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


class AgentLike(ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, behaviour: Behaviour) -> None:
        self.seen = Seen()
        self.behaviour = behaviour
        super().__init__(str(path), Handler)

    def shutdown_request(self, request: object) -> None:
        super().shutdown_request(request)  # type: ignore[arg-type]
        with self.seen.lock:
            self.seen.closed += 1
            self.seen.lock.notify_all()


@contextmanager
def serving(path: Path, behaviour: Behaviour) -> Iterator[AgentLike]:
    server = AgentLike(path, behaviour)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def echo(handler: Handler, body: dict[str, object]) -> None:
    handler.answer(200, {"signed": body.get("challenge")}, {"X-Dfns-Agent-Upstream": "dfns", "X-Twice": "a"})


def test_calls_share_one_kept_alive_connection(short_dir: Path) -> None:
    with serving(short_dir / "a.sock", echo) as server, AgentClient(short_dir / "a.sock") as client:
        for n in range(5):
            assert client.sign({"challenge": f"c{n}"}) == {"signed": {"challenge": f"c{n}"}}
    assert server.seen.connections == 1 and len(server.seen.requests) == 5
    method, path, body = server.seen.requests[0]
    assert (method, path, json.loads(body)) == ("POST", "/v1/sign", {"challenge": {"challenge": "c0"}})


def test_a_connection_the_agent_closed_is_replaced_not_written_to(short_dir: Path) -> None:
    def close_after_answer(handler: Handler, body: dict[str, object]) -> None:
        echo(handler, body)
        handler.close_connection = True  # as the agent does to an idle connection: closed without a word

    with serving(short_dir / "a.sock", close_after_answer) as server, AgentClient(short_dir / "a.sock") as client:
        for n in range(3):
            assert client.sign({"challenge": f"c{n}"})["signed"] == {"challenge": f"c{n}"}
            server.seen.wait_closed(n + 1)  # the agent's side is gone before the next call
    assert server.seen.connections == 3 and len(server.seen.requests) == 3


def test_a_connection_that_dies_during_a_call_is_no_answer_and_the_request_is_not_sent_again(
    short_dir: Path,
) -> None:
    def die(handler: Handler, body: dict[str, object]) -> None:
        handler.close_connection = True  # read the request, answer nothing

    with serving(short_dir / "a.sock", die) as server, AgentClient(short_dir / "a.sock") as client:
        with pytest.raises(AgentClientError) as info:
            client.request("POST", "/wallets", {"network": "EthereumSepolia"})
    assert info.value.code == NO_ANSWER and info.value.status == 0
    assert "may still carry it out" in info.value.message
    assert len(server.seen.requests) == 1, "a request that may have reached the agent is never sent twice"


def test_no_agent_on_the_socket_is_unreachable(short_dir: Path) -> None:
    with AgentClient(short_dir / "none.sock") as client, pytest.raises(AgentClientError) as info:
        client.request("POST", "/wallets", {})
    assert info.value.code == UNREACHABLE and "dfns-agent serve" in info.value.message


TIMEOUT = 0.2


def slow(handler: Handler, body: dict[str, object]) -> None:
    time.sleep(5 * TIMEOUT)  # longer than a signature may take, far shorter than a flow may
    if handler.path == "/v1/user-action":
        handler.answer(200, {"userAction": "ua-1", "payload": "{}"})
    else:
        echo(handler, body)


def test_a_flow_may_take_longer_than_a_signature(short_dir: Path) -> None:
    with serving(short_dir / "a.sock", slow) as server, AgentClient(short_dir / "a.sock", timeout=TIMEOUT) as client:
        assert client.request("POST", "/wallets", {}).status == 200  # waited past ``timeout``
        assert client.user_action("POST", "/wallets")["userAction"] == "ua-1"
        with pytest.raises(AgentClientError) as info:
            client.sign({"challenge": "c"})
    assert info.value.code == NO_ANSWER, info.value
    assert [r[1] for r in server.seen.requests] == ["/v1/request", "/v1/user-action", "/v1/sign"]


def test_the_answer_of_a_request_keeps_dfnss_headers_in_lower_case(short_dir: Path) -> None:
    def twice(handler: Handler, body: dict[str, object]) -> None:
        handler.send_response(201)
        headers = [("Content-Type", "application/json"), ("X-Dfns-Agent-Upstream", "dfns"), ("X-Request-Id", "rq-1"),
                   ("X-Twice", "a"), ("X-Twice", "b"), ("Content-Length", "2")]  # fmt: skip
        for k, v in headers:
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(b"{}")

    with serving(short_dir / "a.sock", twice), AgentClient(short_dir / "a.sock") as client:
        r = client.request("POST", "/wallets", {"name": "été"})
    assert r.status == 201 and r.json() == {}
    assert r.headers["x-request-id"] == "rq-1" and r.headers["x-twice"] == "a, b"
    assert "content-length" not in r.headers


def test_an_agent_error_is_raised_with_its_code(short_dir: Path) -> None:
    def refuse(handler: Handler, body: dict[str, object]) -> None:
        handler.answer(403, {"error": {"code": "forbidden", "message": "not granted"}})

    with serving(short_dir / "a.sock", refuse), AgentClient(short_dir / "a.sock") as client:
        with pytest.raises(AgentClientError) as info:
            client.sign({"challenge": "c"})
    assert (info.value.status, info.value.code, info.value.message) == (403, "forbidden", "not granted")


def test_threads_can_share_one_client(short_dir: Path) -> None:
    release = threading.Barrier(4)

    def slow_echo(handler: Handler, body: dict[str, object]) -> None:
        sent = body["challenge"]  # the client wraps what it signs: {"challenge": <the caller's challenge>}
        assert isinstance(sent, dict)
        if str(sent["challenge"]).startswith("first"):
            release.wait(timeout=30)  # four calls in flight at once, each on its own connection
        echo(handler, body)

    results: dict[int, object] = {}
    with serving(short_dir / "a.sock", slow_echo) as server, AgentClient(short_dir / "a.sock") as client:

        def work(n: int) -> None:
            results[n] = [client.sign({"challenge": f"{tag}-{n}"})["signed"] for tag in ("first", "then")]

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert results == {n: [{"challenge": f"first-{n}"}, {"challenge": f"then-{n}"}] for n in range(4)}
    assert server.seen.connections == 4 and len(server.seen.requests) == 8
