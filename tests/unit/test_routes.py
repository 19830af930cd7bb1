"""The routes in process: :meth:`App.handle` with real :class:`Request` objects on a real connection, one
end of a ``socketpair(AF_UNIX)``, so the caller is what ``SO_PEERCRED`` says; a :class:`SoftKeyStore`
signs and the audit log is real (the same API through a running agent is in ``tests/device/``)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.app.routes import ROUTES, App
from agent.app.state import AgentState, Generation
from agent.config import CredentialConfig, Rule
from agent.core.audit import AuditLog, verify
from agent.core.metrics import Metrics
from agent.core.policy import Policy
from agent.core.service import SigningService
from agent.dev.softkeys import SoftKeyStore
from agent.dev.testing import check_assertion, make_challenge, samples_of, total
from agent.dfnsapi.flow import DfnsFlow
from agent.token.keys import KeyKind
from agent.transport.http import Connection, Limits, Request, Response, Server

T = TypeVar("T")
NOBODY = 65534
CREDS = {"ed": ("key-ed", KeyKind.ED25519, "Y3JlZC1lZA"), "p256": ("key-p256", KeyKind.P256, "Y3JlZC1wMjU2")}


@contextmanager
def as_user(uid: int) -> Iterator[None]:
    """Sockets made in this block carry ``uid`` as their peer credentials (root only: seteuid)."""
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def stranger_socketpair() -> tuple[socket.socket, socket.socket, int]:
    """A socketpair whose peer is a uid the default policy does not admit."""
    if os.geteuid() == 0:
        with as_user(NOBODY):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return a, b, NOBODY
    raise AssertionError("unreachable: non-root runs use a policy that does not admit its own uid")


class Agent:
    def __init__(self, tmp_path: Path, rules: tuple[Rule, ...] = (), own_uid: int | None = None) -> None:
        self.store = SoftKeyStore.with_keys([(label, kind) for label, kind, _ in CREDS.values()])
        configs = [CredentialConfig(name=n, key=label, cred_id=cid) for n, (label, _, cid) in CREDS.items()]
        self.audit_path = tmp_path / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.metrics = Metrics()
        self.service = SigningService.from_config(self.store, configs, self.audit, self.metrics)
        policy = Policy(rules=rules, own_uid=os.geteuid() if own_uid is None else own_uid)
        self.app = App(AgentState(Generation(self.service, DfnsFlow(self.service, {}), policy)))

    def session(
        self, script: Callable[[Callable[..., Awaitable[Response]]], Awaitable[T]], *, stranger: bool = False
    ) -> T:
        """Run ``script(ask)`` where ``ask(method, path, body)`` sends one request over one connection."""

        async def go() -> T:
            if stranger:
                a, b, _ = stranger_socketpair()
            else:
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            server = Server(self.app.handle, Limits())
            loop = asyncio.get_running_loop()
            transport, conn = await loop.connect_accepted_socket(lambda: Connection(server), sock=a)
            assert isinstance(conn, Connection)

            async def ask(method: str, path: str, body: Any = None, raw: bytes | None = None) -> Response:
                content = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
                return await self.app.handle(Request(method, path, "", {}, content, conn))

            try:
                return await script(ask)
            finally:
                transport.close()
                b.close()
                await asyncio.sleep(0)  # let the transport finish closing

        return asyncio.run(go())

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_bytes().splitlines() if line.strip()]


def answer(response: Response) -> Any:
    return json.loads(response.body)


def assert_error(response: Response, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, response.body
    assert response.content_type == "application/json"
    body = answer(response)
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    assert body["error"]["code"] == code and isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    yield a
    a.audit.close()


def test_sign_end_to_end_with_the_kernels_caller_in_the_audit_record(agent: Agent) -> None:
    challenge = make_challenge(CREDS["p256"][2], CREDS["ed"][2])

    async def script(ask: Callable[..., Awaitable[Response]]) -> tuple[Response, Response]:
        named = await ask("POST", "/v1/sign", {"challenge": challenge, "credential": "p256"})
        picked = await ask("POST", "/v1/sign", {"challenge": challenge})
        return named, picked

    named, picked = agent.session(script)
    assert named.status == 200 and picked.status == 200
    p256_pem = agent.store.find_key("key-p256").public_pem
    ed_pem = agent.store.find_key("key-ed").public_pem
    check_assertion(answer(named), challenge, p256_pem, CREDS["p256"][2])
    check_assertion(answer(picked), challenge, ed_pem, CREDS["ed"][2])  # the first configured one allowed
    recs = agent.records()
    assert [r["credential"] for r in recs] == ["p256", "ed"]
    assert recs[0]["caller"]["uid"] == os.geteuid() and recs[0]["caller"]["pid"] == os.getpid()
    assert recs[0]["caller"]["gid"] == os.getegid()
    assert verify(agent.audit_path).ok


def test_unknown_paths_are_404_and_wrong_methods_405(agent: Agent) -> None:
    async def script(ask: Callable[..., Awaitable[Response]]) -> list[Response]:
        return [
            await ask("GET", "/v1/nothing"),
            await ask("GET", "/"),
            await ask("GET", "/v1/sign"),
            await ask("DELETE", "/v1/health"),
            await ask("PUT", "/v1/credentials"),
        ]

    missing, root, get_sign, delete_health, put_credentials = agent.session(script)
    assert "GET /v1/nothing" in assert_error(missing, 404, "not_found")["message"]
    assert_error(root, 404, "not_found")
    assert assert_error(get_sign, 405, "method_not_allowed")["message"] == "GET is not allowed on /v1/sign"
    assert_error(delete_health, 405, "method_not_allowed")
    assert_error(put_credentials, 405, "method_not_allowed")


def test_bad_bodies_are_400_with_the_error_shape_and_are_not_audited(agent: Agent) -> None:
    async def script(ask: Callable[..., Awaitable[Response]]) -> list[Response]:
        return [
            await ask("POST", "/v1/sign", raw=b"{not json"),
            await ask("POST", "/v1/sign", raw=b"[1, 2]"),
            await ask("POST", "/v1/sign", raw=b'{"challenge": NaN}'),
            await ask("POST", "/v1/sign", raw=b""),
            await ask("POST", "/v1/sign", {"challenge": {}, "extra": 1}),
            await ask("POST", "/v1/sign", {"challenge": {"challenge": "has spaces"}}),
            await ask("POST", "/v1/register", {"challenge": {}}),
        ]

    bad_json, array, nan, empty, extra, bad_challenge, no_credential = agent.session(script)
    for r in (bad_json, array, nan, empty):
        assert_error(r, 400, "invalid_json")
    assert "unknown field(s): extra" in assert_error(extra, 400, "invalid_request")["message"]
    assert_error(bad_challenge, 400, "invalid_challenge")
    assert "missing field(s): credential" in assert_error(no_credential, 400, "invalid_request")["message"]
    assert agent.records() == [] and agent.store.signatures == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a foreign peer uid needs root (seteuid); see the next test")
def test_a_caller_the_policy_does_not_admit_gets_403_on_any_path_and_is_audited(agent: Agent) -> None:
    challenge = make_challenge(CREDS["p256"][2])
    paths = [("POST", "/v1/sign"), ("GET", "/v1/health"), ("GET", "/v1/credentials"), ("GET", "/v1/nowhere")]
    paths += [("DELETE", "/v1/sign")]

    async def script(ask: Callable[..., Awaitable[Response]]) -> list[Response]:
        return [await ask(m, p, {"challenge": challenge} if m == "POST" else None) for m, p in paths]

    responses = agent.session(script, stranger=True)
    for r in responses:
        error = assert_error(r, 403, "forbidden")
        assert error["message"].startswith(f"uid {NOBODY} may not use this agent")
    assert agent.store.signatures == 0
    # Refusals are aggregated per caller and reason: the first is recorded at once, the others are counted
    # into one summary record (written when the interval ends, here when the log closes).
    recs = agent.records()
    assert [(r["event"], r["endpoint"], r["caller"]["uid"]) for r in recs] == [("refused", "/v1/sign", NOBODY)]
    agent.audit.close()
    summary = agent.records()[1:]
    assert [(r["event"], r["endpoint"], r["caller"]["uid"], r["count"]) for r in summary] == [
        ("refused", "/v1/sign", NOBODY, len(paths) - 1)
    ]
    samples = samples_of(agent.metrics.render()[0].decode())
    assert total(samples, "dfns_agent_refusals_total", rule="default", code="forbidden") == len(paths)


def test_a_policy_that_does_not_admit_the_callers_uid_refuses_it(tmp_path: Path) -> None:
    """Runs as any user: the caller is this process; the policy admits another uid only (root aside)."""
    uid = os.geteuid()
    if uid == 0:
        pytest.skip("root is always admitted by the default rule; covered by the test above")
    a = Agent(tmp_path, own_uid=uid + 1)
    try:
        r = a.session(lambda ask: ask("GET", "/v1/health"))
        assert_error(r, 403, "forbidden")
    finally:
        a.audit.close()


def test_a_rule_limits_credentials_and_sign_and_its_refusals_are_audited(tmp_path: Path) -> None:
    me = os.geteuid()
    rules = (Rule(name="ed-only", uids=frozenset({me}), credentials=frozenset({"ed"}), allow_sign=True),)
    a = Agent(tmp_path, rules=rules)
    challenge = make_challenge(CREDS["p256"][2], CREDS["ed"][2])

    async def script(ask: Callable[..., Awaitable[Response]]) -> list[Response]:
        return [
            await ask("POST", "/v1/sign", {"challenge": challenge, "credential": "p256"}),
            await ask("POST", "/v1/sign", {"challenge": challenge}),
            await ask("POST", "/v1/register", {"challenge": {"challenge": "Y2g"}, "credential": "ed"}),
        ]

    try:
        named, picked, register = a.session(script)
    finally:
        a.audit.close()
    assert "rule 'ed-only' does not allow credential 'p256'" in assert_error(named, 403, "forbidden")["message"]
    assert picked.status == 200
    check_assertion(answer(picked), challenge, a.store.find_key("key-ed").public_pem, CREDS["ed"][2])
    assert "allow_register" in assert_error(register, 403, "forbidden")["message"]
    recs = a.records()
    assert [(r["event"], r.get("credential"), r.get("endpoint")) for r in recs] == [
        ("refused", "p256", "/v1/sign"),
        ("sign", "ed", None),
        ("refused", "ed", "/v1/register"),
    ]


def test_a_connection_that_is_not_a_unix_socket_is_refused(agent: Agent) -> None:
    async def go() -> Response:
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        server = Server(agent.app.handle, Limits())
        transport, conn = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: Connection(server), sock=accepted
        )
        assert isinstance(conn, Connection)
        try:
            return await agent.app.handle(Request("GET", "/v1/health", "", {}, b"", conn))
        finally:
            transport.close()
            client.close()
            listener.close()
            await asyncio.sleep(0)

    error = assert_error(asyncio.run(go()), 403, "forbidden")
    assert "only serves local callers" in error["message"]


def test_health_is_200_when_ok_and_503_naming_the_missing_key(agent: Agent) -> None:
    ok = agent.session(lambda ask: ask("GET", "/v1/health"))
    assert ok.status == 200
    body = answer(ok)
    assert body["status"] == "ok" and body["keys"] == {"ed": True, "p256": True} and "reason" not in body
    assert body["token"]["serial"] == agent.store.identity.serial
    agent.store.remove("key-p256")
    degraded = agent.session(lambda ask: ask("GET", "/v1/health"))
    assert degraded.status == 503
    body = answer(degraded)
    assert body["status"] == "degraded" and body["keys"] == {"ed": True, "p256": False}
    assert body["reason"] == "key for credential 'p256' not found or changed"


def test_credentials_list_and_request_metrics(agent: Agent) -> None:
    challenge = make_challenge(CREDS["ed"][2])

    async def script(ask: Callable[..., Awaitable[Response]]) -> tuple[Response, Response]:
        listed = await ask("GET", "/v1/credentials")
        for _ in range(3):
            await ask("POST", "/v1/sign", {"challenge": challenge, "credential": "ed"})
        await ask("POST", "/v1/sign", {"challenge": challenge, "credential": "nope"})
        await ask("GET", "/v1/nowhere")
        return listed, await ask("GET", "/v1/metrics")

    listed, metrics = agent.session(script)
    creds = answer(listed)["credentials"]
    assert [(c["name"], c["credId"], c["keyType"]) for c in creds] == [
        ("ed", CREDS["ed"][2], "ed25519"),
        ("p256", CREDS["p256"][2], "p256"),
    ]
    assert creds[0]["fingerprint"] == agent.store.find_key("key-ed").fingerprint
    assert metrics.status == 200 and metrics.content_type.startswith("text/plain")
    samples = samples_of(metrics.body.decode())
    assert total(samples, "dfns_agent_http_requests_total", endpoint="/v1/sign", status="200") == 3
    assert total(samples, "dfns_agent_http_requests_total", endpoint="/v1/sign", status="404") == 1
    assert total(samples, "dfns_agent_http_requests_total", endpoint="other", status="404") == 1
    assert total(samples, "dfns_agent_signatures_total", credential="ed", outcome="ok") == 3


def test_every_route_answers_json_errors_for_a_broken_body(agent: Agent) -> None:
    posts = [path for method, path, _ in ROUTES if method == "POST"]
    assert posts, "no POST routes?"

    async def script(ask: Callable[..., Awaitable[Response]]) -> list[Response]:
        return [await ask("POST", path, raw=b"\xff\xfe not json") for path in posts]

    for response in agent.session(script):
        assert_error(response, 400, "invalid_json")
