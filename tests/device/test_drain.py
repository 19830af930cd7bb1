"""The drain rule (agent/transport/http.py, Server.shutdown): on SIGTERM, a connection the agent has
accepted is owed the reading and answering of one more request that arrives within the drain grace
(0.5 s), answered with ``Connection: close``; a connection that stays silent is closed unanswered.

A connection that has already had one answer is certainly accepted, so these tests send their second
request after the stop began, once quickly (20 ms, a client that pauses between connecting and sending)
and once too late.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from agent.dev.testing import AgentProcess, TokenEnv, connect_raw, make_challenge, wait_until


def _request(cred_id: str) -> bytes:
    body = json.dumps({"challenge": make_challenge(cred_id)}).encode()
    head = f"POST /v1/sign HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return head + body


def _read_answer(s: Any) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += s.recv(65536)
    return head + b"\r\n\r\n" + rest


@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_sent_20ms_after_the_stop_on_an_accepted_connection_is_answered(
    token_env: TokenEnv, start_agent: Any, workers: int
) -> None:
    token_env.write_config(server=f"workers = {workers}\n")
    agent: AgentProcess = start_agent(token_env)
    if workers > 1:
        wait_until(lambda: f"{workers} workers serving" in agent.output(), 30, "every worker serving")
    cred = token_env.credentials["ed25519"]
    conns = [connect_raw(agent.socket_path) for _ in range(4)]
    for s in conns:
        s.sendall(_request(cred))
        assert _read_answer(s).startswith(b"HTTP/1.1 200 "), "the first answer"
    agent.proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    answers = []
    for s in conns:
        s.sendall(_request(cred))
        answers.append(_read_answer(s))
    for a in answers:
        assert a.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in a, a[:200]
        assert b"credentialAssertion" in a
    assert agent.proc.wait(20) == 0


def test_a_connection_silent_past_the_grace_is_closed_unanswered(token_env: TokenEnv, start_agent: Any) -> None:
    agent: AgentProcess = start_agent(token_env)
    s = connect_raw(agent.socket_path)
    s.sendall(_request(token_env.credentials["ed25519"]))
    assert _read_answer(s).startswith(b"HTTP/1.1 200 ")
    t0 = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert s.recv(1) == b""  # closed by the agent: nobody had asked anything
    assert time.monotonic() - t0 >= 0.4  # ... once the grace had passed
    assert agent.proc.wait(20) == 0
