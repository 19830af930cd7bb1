"""Limits an attacker on the same host would probe (issue 13): the whole request head is bounded, however it
arrives; JSON nested deeper than the agent reads is a 400 with a code, never a 500 or a traceback."""

from __future__ import annotations

import json

import pytest

from agent.dev.testing import AgentProcess, connect_raw


def exchange(agent: AgentProcess, data: bytes) -> tuple[int, bytes]:
    with connect_raw(agent.socket_path) as c:
        try:
            c.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before everything was read; the answer is still there
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("where", ["one header", "many headers", "the request line"])
def test_a_200_kb_head_in_one_write_is_431(agent: AgentProcess, where: str) -> None:
    if where == "one header":
        head = b"GET /v1/health HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 200_000 + b"\r\n"
    elif where == "many headers":
        head = b"GET /v1/health HTTP/1.1\r\nHost: a\r\n" + b"".join(
            b"X-%d: %s\r\n" % (i, b"b" * 90) for i in range(2200)
        )
    else:
        head = b"GET /v1/health?" + b"q" * 200_000 + b" HTTP/1.1\r\nHost: a\r\n"
    status, body = exchange(agent, head + b"Connection: close\r\n\r\n")
    assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large", body[:200]
    assert agent.http.get("/v1/health").status_code == 200


DEEP = 2000


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/sign", b'{"challenge": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
        ("/v1/sign", b'{"challenge": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}"),
        ("/v1/request", b'{"method": "POST", "path": "/wallets", "body": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
        # Within what the decoder reads, but too deep to serialize again as the payload and the audit record:
        ("/v1/user-action", b'{"method": "POST", "path": "/wallets", "body": ' + b"[" * 900 + b"]" * 900 + b"}"),
        ("/v1/register", b'{"credential": "p256", "challenge": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    ],
)
def test_deeply_nested_json_is_a_400_with_a_code(agent: AgentProcess, path: str, body: bytes) -> None:
    for _ in range(2):  # and again: the agent keeps serving, the same way
        r = agent.http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"]["code"] == "invalid_json", r.text[:300]
    assert "Traceback" not in agent.output() and "RecursionError" not in agent.output()
    assert agent.http.get("/v1/health").status_code == 200
