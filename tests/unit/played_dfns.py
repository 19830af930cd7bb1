"""Dfns played in process, for the tests of the Dfns client's rules and of the flow.

A function of :class:`httpx.Request` to :class:`httpx.Response` answers what the client sends through its
transport seam (:class:`~agent.dfnsapi.transport.HttpTransport`); it may raise a
:class:`~agent.dfnsapi.transport.TransportError` to play a network failure. What the real transport does
with real sockets (which failures count as sent, TLS, proxies, cookies) is in ``test_dfns_transport.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from agent.dfnsapi.transport import HttpAnswer, HttpRequest

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class HandlerTransport:
    handler: Handler
    sent: list[HttpRequest] = field(default_factory=list)

    async def send(self, request: HttpRequest) -> HttpAnswer:
        self.sent.append(request)
        asked = httpx.Request(request.method, request.url, headers=dict(request.headers), content=request.content)
        answer = self.handler(asked)
        content = answer.read()
        headers = {k: v for k, v in answer.headers.items() if k != "set-cookie"}
        return HttpAnswer(answer.status_code, headers, content)
