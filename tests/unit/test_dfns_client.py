"""The Dfns API client against Dfns played in process (``played_dfns.py``): which calls are retried, how
errors map, what is sent and what is passed back (the client against the dev Dfns server is in
``tests/device/``, its transport on real sockets in ``test_dfns_transport.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from agent.config import DfnsConfig
from agent.dfns import ClientData, KeyAssertion
from agent.dfnsapi import client as client_module
from agent.dfnsapi.client import MAX_ANSWER, MAX_AUTH_ANSWER, DfnsApi, Upstream, mapped_errors
from agent.dfnsapi.transport import Failure, Timeouts, TransportError
from agent.errors import AgentError, DfnsError, DfnsTimeout, DfnsUnreachable
from agent.secret import Secret
from tests.unit.played_dfns import HandlerTransport

BASE = "https://api.dfns.test"
TOKEN = "sa-token-9f3e1c-very-secret"
RETRIES = 3
T = TypeVar("T")

Step = httpx.Response | Failure | Callable[[httpx.Request], httpx.Response]


class FakeDfns:
    """Answers each request with the next scripted step (the last one repeats), and keeps the requests."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []
        self.transport = HandlerTransport(self)  # what the client sends through

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, httpx.Response):
            return step
        if isinstance(step, Failure):
            raise TransportError(step, "scripted")
        return step(request)

    @property
    def calls(self) -> int:
        return len(self.requests)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


def dfns_json(status: int, data: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=data, headers=headers)


def dfns_failure(status: int, message: str = "boom", headers: dict[str, str] | None = None) -> httpx.Response:
    return dfns_json(status, {"error": {"message": message, "errorName": f"E{status}"}}, headers)


CHALLENGE = {"challenge": "Y2gtMQ", "challengeIdentifier": "eyJ0.id", "allowCredentials": {"key": []}}


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Every backoff the client asks for, without waiting for it."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float) -> None:
        asked.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(client_module.asyncio, "sleep", fake_sleep)
    yield asked


def run_with(fake: FakeDfns, call: Callable[[DfnsApi], Awaitable[T]], *, retries: int = RETRIES) -> T:
    cfg = DfnsConfig(base_url=BASE, timeout=7.0, connect_timeout=2.0, retries=retries)
    return asyncio.run(call(DfnsApi(fake.transport, cfg, Secret(TOKEN, "test"), backoff=0)))


def failure_of(fake: FakeDfns, call: Callable[[DfnsApi], Awaitable[Any]]) -> AgentError:
    with pytest.raises(AgentError) as e:
        run_with(fake, call)
    assert TOKEN not in str(e.value) and TOKEN not in json.dumps(e.value.to_json()), "the bearer token leaked"
    return e.value


def init_action(api: DfnsApi) -> Awaitable[dict[str, Any]]:
    return api.init_user_action("POST", "/wallets", '{"network":"EthereumSepolia"}')


ASSERTION = KeyAssertion("c", ClientData(b'{"challenge":"abc","type":"key.get"}'), b"\x01\x02")


def complete(api: DfnsApi) -> Awaitable[str]:
    return api.complete_user_action("eyJ0.id", ASSERTION)


def send_post(api: DfnsApi) -> Awaitable[Upstream]:
    return api.send("POST", "/wallets", b'{"network":"EthereumSepolia"}', "ua-token")


# -- challenge-creating calls: retried -------------------------------------------------------------


def test_init_user_action_sends_the_action_and_returns_the_challenge() -> None:
    fake = FakeDfns(dfns_json(200, CHALLENGE))
    assert run_with(fake, init_action) == CHALLENGE
    [request] = fake.requests
    assert request.method == "POST" and str(request.url) == f"{BASE}/auth/action/init"
    assert json.loads(request.content) == {
        "userActionHttpMethod": "POST",
        "userActionHttpPath": "/wallets",
        "userActionPayload": '{"network":"EthereumSepolia"}',
        "userActionServerKind": "Api",
    }
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    [sent] = fake.transport.sent
    assert sent.timeouts == Timeouts(connect=2.0, pool=7.0, read=7.0, total=9.0)
    assert sent.max_answer == MAX_AUTH_ANSWER


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_challenge_calls_are_retried_on_429_and_5xx(status: int, sleeps: list[float]) -> None:
    fake = FakeDfns(dfns_failure(status), dfns_failure(status), dfns_json(200, CHALLENGE))
    assert run_with(fake, init_action) == CHALLENGE
    assert fake.calls == 3
    assert fake.bodies()[0] == fake.bodies()[2]  # the same call again
    assert sleeps == [0.0, 0.0]  # backoff=0


def test_retry_after_is_honoured_and_bounded(sleeps: list[float]) -> None:
    fake = FakeDfns(
        dfns_failure(429, headers={"Retry-After": "2"}),
        dfns_failure(503, headers={"Retry-After": "3600"}),
        dfns_failure(429, headers={"Retry-After": "soon"}),
        dfns_json(200, {"challenge": "Y2gtMg", "kind": "Key"}),
    )
    assert run_with(fake, lambda api: api.init_registration())["challenge"] == "Y2gtMg"
    assert sleeps == [2.0, 30.0, 0.0]  # as asked; at most 30 s; an unreadable value falls back to the backoff
    assert [str(r.url) for r in fake.requests] == [f"{BASE}/auth/credentials/init"] * 4
    assert fake.bodies() == [{"kind": "Key"}] * 4


@pytest.mark.parametrize("error", [f for f in Failure if f is not Failure.TOO_LARGE])
def test_challenge_calls_are_retried_on_network_errors(error: Failure) -> None:
    fake = FakeDfns(error, dfns_json(200, CHALLENGE))
    assert run_with(fake, init_action) == CHALLENGE
    assert fake.calls == 2


def test_a_challenge_answer_too_large_to_read_is_a_dfns_error_and_not_retried() -> None:
    fake = FakeDfns(Failure.TOO_LARGE, dfns_json(200, CHALLENGE))
    e = failure_of(fake, init_action)
    assert type(e) is DfnsError and e.status == 502 and "larger than the agent reads" in e.message
    assert fake.calls == 1  # Dfns answered: the same call would get the same answer


def test_challenge_calls_give_up_after_the_configured_retries_keeping_dfnss_answer(sleeps: list[float]) -> None:
    fake = FakeDfns(dfns_failure(503, "maintenance"))
    error = failure_of(fake, init_action)
    assert fake.calls == 1 + RETRIES and len(sleeps) == RETRIES
    assert isinstance(error, DfnsError) and error.status == 503 and error.code == "dfns_error"
    assert error.details["dfns"] == {"message": "maintenance", "errorName": "E503"}
    assert error.message == "Dfns answered POST /auth/action/init with 503: maintenance"


@pytest.mark.parametrize(
    ("error", "expected", "status"),
    [
        (Failure.CONNECT, DfnsUnreachable, 502),
        (Failure.CONNECT_TIMEOUT, DfnsTimeout, 504),
        (Failure.TIMEOUT, DfnsTimeout, 504),
        (Failure.BROKEN, DfnsUnreachable, 502),
    ],
)
def test_challenge_calls_that_never_get_an_answer_map_to_unreachable_or_timeout(
    error: Failure, expected: type[AgentError], status: int
) -> None:
    fake = FakeDfns(error)
    e = failure_of(fake, init_action)
    assert fake.calls == 1 + RETRIES
    assert type(e) is expected and e.status == status
    assert "/auth/action/init" in e.message


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_challenge_calls_are_not_retried_on_other_errors(status: int) -> None:
    fake = FakeDfns(dfns_failure(status, "no such thing"))
    e = failure_of(fake, init_action)
    assert fake.calls == 1
    assert isinstance(e, DfnsError) and e.status == status
    assert e.to_json()["error"]["dfns"] == {"message": "no such thing", "errorName": f"E{status}"}


def test_an_error_answer_that_is_not_json_is_kept_as_its_text() -> None:
    fake = FakeDfns(httpx.Response(401, text="<html>unauthorized</html>"))
    e = failure_of(fake, init_action)
    assert isinstance(e, DfnsError) and e.status == 401
    assert e.details["dfns"] == {"body": "<html>unauthorized</html>"}
    assert e.message.endswith("with 401: <html>unauthorized</html>")


def test_a_success_without_a_json_object_is_a_502() -> None:
    e = failure_of(FakeDfns(httpx.Response(200, text="[1, 2]")), init_action)
    assert isinstance(e, DfnsError) and e.status == 502 and "no JSON object" in e.message


# -- POST /auth/action: never retried --------------------------------------------------------------


def test_complete_user_action_returns_the_token_and_sends_the_first_factor() -> None:
    fake = FakeDfns(dfns_json(200, {"userAction": "ua-1"}))
    assert run_with(fake, complete) == "ua-1"
    [request] = fake.requests
    assert str(request.url) == f"{BASE}/auth/action"
    assert json.loads(request.content) == {
        "challengeIdentifier": "eyJ0.id",
        "firstFactor": {
            "kind": "Key",
            "credentialAssertion": {"credId": "c", "clientData": ASSERTION.client_data.b64url, "signature": "AQI"},
        },
    }
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("step", "expected", "status"),
    [
        (dfns_failure(503), DfnsError, 503),
        (dfns_failure(429), DfnsError, 429),
        (Failure.CONNECT, DfnsUnreachable, 502),
        (Failure.TIMEOUT, DfnsTimeout, 504),
        (Failure.BROKEN, DfnsUnreachable, 502),
    ],
)
def test_complete_user_action_is_never_retried(step: Step, expected: type[AgentError], status: int) -> None:
    fake = FakeDfns(step, dfns_json(200, {"userAction": "ua-1"}))
    e = failure_of(fake, complete)
    assert fake.calls == 1, "a challenge must never be replayed"
    assert type(e) is expected and e.status == status


def test_complete_user_action_without_a_token_is_a_502() -> None:
    e = failure_of(FakeDfns(dfns_json(200, {"userAction": ""})), complete)
    assert isinstance(e, DfnsError) and e.status == 502 and "without a userAction" in e.message


# -- the real request: retried only when nothing reached Dfns --------------------------------------


def test_send_carries_the_user_action_and_the_exact_body() -> None:
    fake = FakeDfns(dfns_json(200, {"id": "wa-1"}, headers={"X-Request-Id": "rq-1"}))
    up = run_with(fake, send_post)
    assert up.status == 200 and json.loads(up.content) == {"id": "wa-1"}
    [request] = fake.requests
    assert request.method == "POST" and str(request.url) == f"{BASE}/wallets"
    assert request.content == b'{"network":"EthereumSepolia"}'
    assert request.headers["x-dfns-useraction"] == "ua-token"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


def test_a_get_goes_without_a_body_content_type_or_user_action() -> None:
    fake = FakeDfns(dfns_json(200, {"items": []}))
    up = run_with(fake, lambda api: api.send("GET", "/wallets?limit=2", None, None))
    assert up.status == 200
    [request] = fake.requests
    assert request.method == "GET" and request.url.path == "/wallets" and request.url.query == b"limit=2"
    assert request.content == b""
    assert "x-dfns-useraction" not in request.headers and "content-type" not in request.headers
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("error", [Failure.CONNECT, Failure.CONNECT_TIMEOUT])
def test_send_is_retried_when_the_connection_was_never_made(error: Failure, sleeps: list[float]) -> None:
    fake = FakeDfns(error, error, dfns_json(201, {"id": "wa-1"}))
    up = run_with(fake, send_post)
    assert up.status == 201 and fake.calls == 3 and len(sleeps) == 2
    assert {r.content for r in fake.requests} == {b'{"network":"EthereumSepolia"}'}


def test_send_gives_up_after_the_retries_when_dfns_stays_unreachable() -> None:
    fake = FakeDfns(Failure.CONNECT)
    e = failure_of(fake, send_post)
    assert fake.calls == 1 + RETRIES
    assert isinstance(e, DfnsUnreachable) and e.status == 502 and "cannot reach Dfns" in e.message


@pytest.mark.parametrize(
    ("error", "expected", "status"),
    [
        (Failure.TIMEOUT, DfnsTimeout, 504),
        (Failure.BROKEN, DfnsUnreachable, 502),
    ],
)
def test_send_is_never_retried_once_the_request_may_have_reached_dfns(
    error: Failure, expected: type[AgentError], status: int
) -> None:
    fake = FakeDfns(error, dfns_json(200, {"id": "wa-1"}))
    e = failure_of(fake, send_post)
    assert fake.calls == 1, "the real request must never reach Dfns twice"
    assert type(e) is expected and e.status == status
    assert "may or may not have been executed" in e.message


@pytest.mark.parametrize("status", [202, 400, 429, 500, 503])
def test_dfnss_answer_to_the_real_request_comes_back_unchanged_and_is_not_retried(status: int) -> None:
    fake = FakeDfns(dfns_failure(status, "as dfns said"), dfns_json(200, {}))
    up = run_with(fake, send_post)
    assert fake.calls == 1
    assert up.status == status and json.loads(up.content)["error"]["message"] == "as dfns said"


def test_only_harmless_headers_are_passed_through() -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Retry-After", "5"),
        ("Location", "/wallets/wa-1"),
        ("X-Request-Id", "rq-1"),
        ("X-DFNS-USERACTION", "ua-token"),
        ("Set-Cookie", "session=abc"),
        ("Authorization", f"Bearer {TOKEN}"),
        ("Server", "nginx"),
        ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ]
    fake = FakeDfns(httpx.Response(200, headers=headers, content=b"{}"))
    up = run_with(fake, send_post)
    assert up.headers == {
        "content-type": "application/json",
        "retry-after": "5",
        "location": "/wallets/wa-1",
        "x-request-id": "rq-1",
    }


# -- the token never shows ------------------------------------------------------------------------


def test_the_bearer_token_is_sent_on_every_call_and_shows_in_no_error() -> None:
    calls: list[Callable[[DfnsApi], Awaitable[Any]]] = [
        init_action,
        lambda api: api.init_registration(),
        complete,
        send_post,
    ]
    steps: list[Step] = [
        dfns_failure(401, "bad token"),
        Failure.CONNECT,
        Failure.TIMEOUT,
        Failure.BROKEN,
    ]
    for call in calls:
        ok = FakeDfns(dfns_json(200, {**CHALLENGE, "userAction": "ua-1"}))
        run_with(ok, call)
        assert ok.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
        for step in steps:
            fake = FakeDfns(step)
            try:
                result = run_with(fake, call, retries=0)
            except AgentError as e:
                assert TOKEN not in str(e) and TOKEN not in repr(e) and TOKEN not in json.dumps(e.to_json())
            else:
                assert isinstance(result, Upstream) and TOKEN not in repr(result)


def test_mapped_errors_is_the_one_mapping_of_transport_failures() -> None:
    cases: list[tuple[Failure, bool, type[AgentError], str]] = [
        (Failure.CONNECT, False, DfnsUnreachable, "cannot reach Dfns"),
        (Failure.CONNECT, True, DfnsUnreachable, "cannot reach Dfns"),
        (Failure.CONNECT_TIMEOUT, False, DfnsTimeout, "did not answer"),
        (Failure.CONNECT_TIMEOUT, True, DfnsUnreachable, "cannot reach Dfns"),  # a real call that never left
        (Failure.TIMEOUT, False, DfnsTimeout, "did not answer"),
        (Failure.TIMEOUT, True, DfnsTimeout, "may or may not have been executed"),
        (Failure.BROKEN, False, DfnsUnreachable, "cannot reach Dfns"),
        (Failure.BROKEN, True, DfnsUnreachable, "may or may not have been executed"),
        (Failure.TOO_LARGE, False, DfnsError, "larger than the agent reads"),
        (Failure.TOO_LARGE, True, DfnsError, "larger than the agent reads"),
    ]
    assert {(f, u) for f, u, _, _ in cases} == {(f, u) for f in Failure for u in (False, True)}
    for failure, unsure, expected, says in cases:
        with pytest.raises(AgentError) as e:
            with mapped_errors(BASE, "POST /x", 7.0, unsure=unsure):
                raise TransportError(failure, "detail from the transport")
        assert type(e.value) is expected, (failure, unsure)
        assert "POST /x" in e.value.message and says in e.value.message, (failure, unsure, e.value.message)
        assert "detail from the transport" not in e.value.message
        assert e.value.__cause__ is None and e.value.__suppress_context__  # `from None`: no transport detail


@pytest.mark.parametrize(("status", "executed"), [(200, True), (202, True), (409, False)])
def test_an_answer_too_large_to_read_says_whether_dfns_executed_the_real_call(status: int, executed: bool) -> None:
    with pytest.raises(DfnsError) as e:
        with mapped_errors(BASE, "POST /wallets", 7.0, unsure=True):
            raise TransportError(Failure.TOO_LARGE, "over 8388608 bytes", status)
    assert e.value.status == 502 and e.value.code == "dfns_error"
    assert f"with {status}" in e.value.message
    assert ("it was executed" in e.value.message) is executed, e.value.message


def test_the_real_call_reads_a_larger_answer_than_the_auth_steps() -> None:
    fake = FakeDfns(dfns_json(200, {"id": "wa-1"}))
    run_with(fake, send_post)
    [sent] = fake.transport.sent
    assert sent.max_answer == MAX_ANSWER > MAX_AUTH_ANSWER
