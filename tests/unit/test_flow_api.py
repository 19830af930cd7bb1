"""The Dfns flow in process: a signing service over a :class:`SoftKeyStore`, and Dfns played in process
(``played_dfns.py``), checking every step as Dfns would (the flow against the dev Dfns server and SoftHSM is in
``tests/device/``)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.app.bodies import json_object
from agent.caller import Caller
from agent.config import CredentialConfig, DfnsConfig
from agent.core.audit import AuditLog, verify
from agent.core.policy import Grant
from agent.core.service import SigningService
from agent.dev.softkeys import PrivateKey, SoftKeyStore
from agent.dev.testing import b64url, b64url_decode
from agent.dfns import credential_fingerprint
from agent.dfnsapi.client import DfnsApi
from agent.dfnsapi.flow import DfnsCall, DfnsFlow, Registered, serialize_payload
from agent.errors import BadRequest, DfnsError, DfnsNotConfigured, Forbidden, UnknownCredential
from agent.secret import Secret
from agent.token.keys import KeyKind
from tests.unit.played_dfns import HandlerTransport

BASE = "https://api.dfns.test"
TOKEN = "dfns-bearer-for-tests"
CALLER = Caller(uid=1000, gid=1000, pid=77, exe="/usr/bin/node")
T = TypeVar("T")

# name -> (key label, kind, credId, has [credential.dfns])
CREDENTIALS = {
    "main": ("key-main", KeyKind.P256, "Y2ktbWFpbg", True),
    "ops": ("key-ops", KeyKind.ED25519, "Y2ktb3Bz", True),
    "new": ("key-new", KeyKind.RSA2048, "Y2ktbmV3", False),
}


def verify_dfns(public: object, signature: bytes, message: bytes) -> bool:
    """Dfns's check (§3), written out with cryptography."""
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, message)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except Exception:
        return False
    return True


@dataclass
class Dfns:
    """Just enough of Dfns for the flow: challenges, assertion checks, single-use user actions bound to the
    method, path and payload they were signed for, and Key credential registration."""

    keys: dict[str, PrivateKey]  # credId -> key (the public half is what Dfns knows)
    requests: list[httpx.Request] = field(default_factory=list)
    challenges: dict[str, dict[str, Any]] = field(default_factory=dict)  # challengeIdentifier -> the action
    actions: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # token -> (method, path, payload)
    registered: list[dict[str, Any]] = field(default_factory=list)
    issued: list[dict[str, Any]] = field(default_factory=list)  # the /auth/action/init answers
    fail: dict[str, httpx.Response] = field(default_factory=dict)  # path -> a canned answer
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.raw_path.decode()
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return self._error(401, "Unauthorized")
        if path in self.fail:
            return self.fail[path]
        if request.method == "POST" and path == "/auth/action/init":
            return self._init_action(json.loads(request.content))
        if request.method == "POST" and path == "/auth/action":
            return self._complete(json.loads(request.content))
        if request.method == "POST" and path == "/auth/credentials/init":
            n = next(self._ids)
            body = {"kind": "Key", "challenge": b64url(f"reg-{n}".encode()), "challengeIdentifier": f"reg-id-{n}"}
            self.challenges[body["challengeIdentifier"]] = {"registration": body["challenge"]}
            return httpx.Response(200, json=body)
        return self._real_call(request, path)

    @staticmethod
    def _error(status: int, message: str) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": message}})

    def _init_action(self, body: dict[str, Any]) -> httpx.Response:
        n = next(self._ids)
        challenge = {
            "challenge": b64url(f"ch-{n}".encode()),
            "challengeIdentifier": f"eyJ0.challenge-{n}",
            "allowCredentials": {"key": [{"type": "public-key", "id": c} for c in self.keys], "webauthn": []},
        }
        self.challenges[challenge["challengeIdentifier"]] = {**body, "challenge": challenge["challenge"]}
        self.issued.append(challenge)
        return httpx.Response(200, json=challenge)

    def _complete(self, body: dict[str, Any]) -> httpx.Response:
        pending = self.challenges.pop(body["challengeIdentifier"], None)
        if pending is None or "registration" in pending:
            return self._error(400, "unknown or used challenge")
        factor = body["firstFactor"]
        assertion = factor["credentialAssertion"]
        data = b64url_decode(assertion["clientData"])
        key = self.keys.get(assertion["credId"])
        if factor["kind"] != "Key" or key is None:
            return self._error(401, "unknown credential")
        if json.loads(data) != {"challenge": pending["challenge"], "type": "key.get"}:
            return self._error(401, "clientData does not match the challenge")
        if not verify_dfns(key.public_key(), b64url_decode(assertion["signature"]), data):
            return self._error(401, "Unable to verify signature")
        token = f"ua-{next(self._ids)}"
        self.actions[token] = (
            pending["userActionHttpMethod"],
            pending["userActionHttpPath"],
            pending["userActionPayload"],
        )
        return httpx.Response(200, json={"userAction": token})

    def _real_call(self, request: httpx.Request, path: str) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"items": [], "path": path}, headers={"X-Request-Id": "rq-get"})
        token = request.headers.get("x-dfns-useraction")
        action = self.actions.pop(token, None) if token else None
        if action is None:
            return self._error(401, "user action missing or already used")
        method, signed_path, payload = action
        if (method, signed_path) != (request.method, path.split("?", 1)[0]):
            return self._error(403, "user action was signed for another call")
        if payload.encode("utf-8") != request.content:
            return self._error(400, "body does not match the signed payload")
        if path == "/auth/credentials":
            return self._register(json.loads(request.content))
        return httpx.Response(200, json={"done": path, "got": json.loads(request.content)})

    def _register(self, body: dict[str, Any]) -> httpx.Response:
        info = body["credentialInfo"]
        data = b64url_decode(info["clientData"])
        pending = self.challenges.pop(body["challengeIdentifier"], {})
        if json.loads(data) != {"challenge": pending.get("registration"), "type": "key.create"}:
            return self._error(400, "clientData does not match the registration challenge")
        attestation = json.loads(b64url_decode(info["attestationData"]))
        public = load_pem_public_key(attestation["publicKey"].encode())
        if not verify_dfns(
            public, bytes.fromhex(attestation["signature"]), credential_fingerprint(data, attestation["publicKey"])
        ):
            return self._error(400, "attestation does not verify")
        self.registered.append(body)
        return httpx.Response(200, json={"credentialId": "cr-1", "credentialName": body["credentialName"]})

    def steps(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.raw_path.decode()) for r in self.requests]


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SoftKeyStore.with_keys([(label, kind) for label, kind, _, _ in CREDENTIALS.values()])
        configs = [
            CredentialConfig(name=name, key=label, cred_id=cred_id, dfns=DfnsConfig(base_url=BASE) if dfns else None)
            for name, (label, _, cred_id, dfns) in CREDENTIALS.items()
        ]
        self.audit_path = tmp_path / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.service = SigningService.from_config(self.store, configs, self.audit)
        known = {"main", "ops"}  # "new" is not a Dfns credential until it is registered
        self.dfns = Dfns({CREDENTIALS[n][2]: self.store.private_key(CREDENTIALS[n][0]) for n in known})

    def run(self, call: Callable[[DfnsFlow], Awaitable[T]]) -> T:
        http = HandlerTransport(self.dfns)
        apis = {
            name: DfnsApi(http, DfnsConfig(base_url=BASE, retries=1), Secret(TOKEN, "test"), backoff=0)
            for name, (_, _, _, dfns) in CREDENTIALS.items()
            if dfns
        }
        return asyncio.run(call(DfnsFlow(self.service, apis)))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.audit.close()


BODY = {"network": "EthereumSepolia", "name": "été ✓", "tags": ["b", "a"], "n": 1.5}


# -- user actions -----------------------------------------------------------------------------------


def test_user_action_payload_is_serialized_once_and_is_what_dfns_signed(world: World) -> None:
    result = world.run(lambda flow: flow.user_action(DfnsCall("POST", "/wallets", BODY, "main"), caller=CALLER))
    assert result.payload == serialize_payload(BODY) == json.dumps(BODY, separators=(",", ":"), ensure_ascii=False)
    assert world.dfns.steps() == [("POST", "/auth/action/init"), ("POST", "/auth/action")]
    init = json.loads(world.dfns.requests[0].content)
    assert init["userActionPayload"] == result.payload
    assert (init["userActionHttpMethod"], init["userActionHttpPath"]) == ("POST", "/wallets")
    assert result.token in world.dfns.actions  # the token Dfns handed out, unused
    assert result.to_json() == {"userAction": result.token, "payload": result.payload}


def test_request_sends_the_exact_signed_bytes_with_the_user_action_from_auth_action(world: World) -> None:
    up = world.run(lambda flow: flow.request(DfnsCall("POST", "/wallets", BODY, "main"), caller=CALLER))
    assert up.status == 200, up.content
    assert json.loads(up.content) == {"done": "/wallets", "got": BODY}
    init, complete, real = world.dfns.requests
    payload = json.loads(init.content)["userActionPayload"]
    assert real.content == payload.encode("utf-8")  # the same bytes, not a second serialization
    assert json.loads(complete.content)["challengeIdentifier"] == world.dfns.issued[0]["challengeIdentifier"]
    assert world.dfns.actions == {}  # the user action was spent on the real call
    assert real.headers["content-type"] == "application/json"
    assert complete.url.path == "/auth/action"


def test_the_user_action_header_is_the_token_auth_action_answered(world: World) -> None:
    answers: list[str] = []
    real_complete = world.dfns._complete

    def spy(body: dict[str, Any]) -> httpx.Response:
        response = real_complete(body)
        answers.append(json.loads(response.content)["userAction"])
        return response

    world.dfns._complete = spy  # type: ignore[method-assign]
    world.run(lambda flow: flow.request(DfnsCall("DELETE", "/wallets/wa-1/tags", None, "ops")))
    assert world.dfns.requests[-1].headers["x-dfns-useraction"] == answers[0]
    assert world.dfns.requests[-1].content == b"{}"  # a bodyless mutation sends {} and signs "{}"
    assert json.loads(world.dfns.requests[0].content)["userActionPayload"] == "{}"


def test_the_first_factor_verifies_against_the_key_of_the_credential_used(world: World) -> None:
    world.run(lambda flow: flow.user_action(DfnsCall("POST", "/wallets", BODY, "ops")))
    sent = json.loads(world.dfns.requests[1].content)["firstFactor"]["credentialAssertion"]
    assert sent["credId"] == CREDENTIALS["ops"][2]
    data = b64url_decode(sent["clientData"])
    assert json.loads(data) == {"challenge": world.dfns.issued[0]["challenge"], "type": "key.get"}
    ops_key = world.store.private_key("key-ops").public_key()
    main_key = world.store.private_key("key-main").public_key()
    assert verify_dfns(ops_key, b64url_decode(sent["signature"]), data)
    assert not verify_dfns(main_key, b64url_decode(sent["signature"]), data)


def test_a_signature_dfns_rejects_is_dfnss_error_and_the_signature_is_still_audited(world: World) -> None:
    # Dfns knows another key for main's credId: the assertion cannot verify.
    world.dfns.keys[CREDENTIALS["main"][2]] = world.store.private_key("key-ops")
    with pytest.raises(DfnsError) as e:
        world.run(lambda flow: flow.request(DfnsCall("POST", "/wallets", BODY, "main")))
    assert e.value.status == 401 and "Unable to verify signature" in e.value.message
    assert world.dfns.steps() == [("POST", "/auth/action/init"), ("POST", "/auth/action")]
    [rec] = world.records()
    assert rec["event"] == "sign" and rec["outcome"] == "ok" and rec["credential"] == "main"


def test_an_init_failure_signs_nothing(world: World) -> None:
    world.dfns.fail["/auth/action/init"] = httpx.Response(403, json={"error": {"message": "no permission"}})
    with pytest.raises(DfnsError) as e:
        world.run(lambda flow: flow.request(DfnsCall("POST", "/wallets", BODY, "main")))
    assert e.value.status == 403 and e.value.details["dfns"] == {"message": "no permission"}
    assert world.store.signatures == 0 and world.records() == []


def test_a_query_string_is_sent_but_not_signed_as_the_path(world: World) -> None:
    up = world.run(lambda flow: flow.request(DfnsCall("POST", "/wallets/wa-1/transfers?dryRun=true", BODY, "main")))
    assert up.status == 200, up.content
    assert json.loads(world.dfns.requests[0].content)["userActionHttpPath"] == "/wallets/wa-1/transfers"
    assert world.dfns.requests[-1].url.raw_path == b"/wallets/wa-1/transfers?dryRun=true"
    [rec] = world.records()
    assert rec["action"]["path"] == "/wallets/wa-1/transfers?dryRun=true"


def test_get_passes_through_without_a_user_action(world: World) -> None:
    up = world.run(lambda flow: flow.request(DfnsCall("GET", "/wallets?limit=1", None, "main")))
    assert up.status == 200 and json.loads(up.content)["path"] == "/wallets?limit=1"
    assert up.headers["x-request-id"] == "rq-get"
    [request] = world.dfns.requests
    assert request.method == "GET" and "x-dfns-useraction" not in request.headers
    assert world.store.signatures == 0 and world.records() == []


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE"])
def test_user_action_is_refused_for_methods_that_do_not_mutate(world: World, method: str) -> None:
    with pytest.raises(BadRequest, match="need no user action"):
        world.run(lambda flow: flow.user_action(DfnsCall(method, "/wallets", None, "main")))
    assert world.dfns.requests == []


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "CONNECT"])
def test_request_is_refused_for_other_methods(world: World, method: str) -> None:
    with pytest.raises(BadRequest, match="method must be GET or one of"):
        world.run(lambda flow: flow.request(DfnsCall(method, "/wallets", None, "main")))
    assert world.dfns.requests == []


def test_a_get_with_a_body_is_refused(world: World) -> None:
    with pytest.raises(BadRequest, match="GET request has no body"):
        world.run(lambda flow: flow.request(DfnsCall("GET", "/wallets", {"x": 1}, "main")))
    assert world.dfns.requests == []


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ({"name": "\ud800"}, "lone surrogate"),  # "\\ud800" in a request body reads as this: valid JSON syntax
        ({"amount": float("inf")}, "NaN or Infinity"),  # (the body reader refuses 1e400; this is the second guard)
    ],
)
@pytest.mark.parametrize("step", ["request", "user_action"])
def test_a_body_that_cannot_be_sent_as_json_is_refused_before_any_call_to_dfns(
    world: World, body: dict[str, Any], what: str, step: str
) -> None:
    """What the agent signs and sends must be JSON in UTF-8; a body that is not is the caller's 400, found
    before a challenge is asked for (not a 500 after one was used up)."""
    call = DfnsCall("POST", "/wallets", body, "main")
    with pytest.raises(BadRequest, match=what) as e:
        world.run(lambda flow: getattr(flow, step)(call))
    assert e.value.code == "invalid_json"
    assert world.dfns.requests == [] and world.store.signatures == 0 and world.records() == []


def test_an_escaped_lone_surrogate_in_a_request_body_reads_as_one() -> None:
    assert json_object(b'{"name":"\\ud800"}') == {"name": "\ud800"}


@pytest.mark.parametrize(
    "path",
    [
        "wallets",
        "https://evil.example/wallets",
        "/wallets/../auth/credentials",
        "/wallets/..",
        "/wallets#fragment",
        "/wallets x",
        "/wallets\n",
        "/" + "a" * 2048,
        "",
    ],
)
def test_paths_that_are_not_plain_dfns_api_paths_are_refused(world: World, path: str) -> None:
    for call in (
        lambda flow: flow.user_action(DfnsCall("POST", path, None, "main")),
        lambda flow: flow.request(DfnsCall("POST", path, None, "main")),
    ):
        with pytest.raises(BadRequest, match="absolute Dfns API path"):
            world.run(call)
    assert world.dfns.requests == []


def test_a_path_that_looks_like_another_host_is_refused(world: World) -> None:
    # An empty segment: refused with the other malformed paths, before anything is sent (issue 13).
    with pytest.raises(BadRequest, match="empty") as e:
        world.run(lambda flow: flow.request(DfnsCall("GET", "//evil.example/wallets", None, "main")))
    assert e.value.code == "invalid_path" and world.dfns.requests == []


def test_credential_choice_follows_the_grant_and_the_dfns_settings(world: World) -> None:
    only_ops = Grant(rule="ops-only", credentials=frozenset({"ops"}))
    world.run(lambda flow: flow.user_action(DfnsCall("POST", "/wallets", None, None), grant=only_ops))
    sent = json.loads(world.dfns.requests[1].content)["firstFactor"]["credentialAssertion"]
    assert sent["credId"] == CREDENTIALS["ops"][2]
    with pytest.raises(Forbidden, match="does not allow credential 'main'"):
        world.run(lambda flow: flow.user_action(DfnsCall("POST", "/wallets", None, "main"), grant=only_ops))
    with pytest.raises(UnknownCredential):
        world.run(lambda flow: flow.user_action(DfnsCall("POST", "/wallets", None, "nope")))
    with pytest.raises(DfnsNotConfigured, match="'new' has no"):
        world.run(lambda flow: flow.user_action(DfnsCall("POST", "/wallets", None, "new")))
    only_new = Grant(rule="new-only", credentials=frozenset({"new"}))
    with pytest.raises(DfnsNotConfigured, match="no credential you may use"):
        world.run(lambda flow: flow.request(DfnsCall("POST", "/wallets", None, None), grant=only_new))
    assert len(world.dfns.requests) == 2  # only the first call reached Dfns


def test_each_signature_is_audited_with_its_action(world: World) -> None:
    async def both(flow: DfnsFlow) -> None:
        await flow.request(DfnsCall("POST", "/wallets", BODY, "main"), caller=CALLER)
        await flow.user_action(DfnsCall("PUT", "/wallets/wa-1/tags", {"tags": ["x"]}, "ops"), caller=CALLER)

    world.run(both)
    recs = world.records()
    assert [(r["credential"], r["action"]) for r in recs] == [
        (
            "main",
            {
                "method": "POST",
                "path": "/wallets",
                "payloadSha256": hashlib.sha256(serialize_payload(BODY).encode()).hexdigest(),
            },
        ),
        (
            "ops",
            {
                "method": "PUT",
                "path": "/wallets/wa-1/tags",
                "payloadSha256": hashlib.sha256(b'{"tags":["x"]}').hexdigest(),
            },
        ),
    ]
    assert all(r["caller"]["pid"] == 77 and r["outcome"] == "ok" for r in recs)
    for rec, complete in zip(recs, [world.dfns.requests[1], world.dfns.requests[4]], strict=True):
        sent = json.loads(complete.content)["firstFactor"]["credentialAssertion"]
        assert rec["signature"] == sent["signature"]
        assert rec["clientDataSha256"] == hashlib.sha256(b64url_decode(sent["clientData"])).hexdigest()
    assert verify(world.audit_path).ok


# -- registering a credential -----------------------------------------------------------------------


def test_register_credential_signs_key_create_with_the_new_key_and_the_user_action_with_via(world: World) -> None:
    answer = world.run(lambda flow: flow.register_credential("new", "main", "rotated key", caller=CALLER))
    assert answer == Registered(200, {"credentialId": "cr-1", "credentialName": "rotated key"})
    assert world.dfns.steps() == [
        ("POST", "/auth/credentials/init"),
        ("POST", "/auth/action/init"),
        ("POST", "/auth/action"),
        ("POST", "/auth/credentials"),
    ]
    [body] = world.dfns.registered  # the fake verified clientData and the attestation
    assert body["credentialKind"] == "Key" and body["challengeIdentifier"] == "reg-id-0"
    info = body["credentialInfo"]
    assert info["credId"] == CREDENTIALS["new"][2]
    attestation = json.loads(b64url_decode(info["attestationData"]))
    assert attestation["publicKey"] == world.store.find_key("key-new").public_pem
    init = json.loads(world.dfns.requests[1].content)
    assert init["userActionHttpPath"] == "/auth/credentials"
    assert init["userActionPayload"].encode() == world.dfns.requests[3].content
    sent = json.loads(world.dfns.requests[2].content)["firstFactor"]["credentialAssertion"]
    assert sent["credId"] == CREDENTIALS["main"][2]  # the user action is the existing credential's
    register_rec, sign_rec = world.records()
    assert (register_rec["event"], register_rec["credential"]) == ("register", "new")
    assert (sign_rec["event"], sign_rec["credential"]) == ("sign", "main")
    assert sign_rec["action"] == {
        "method": "POST",
        "path": "/auth/credentials",
        "payloadSha256": hashlib.sha256(world.dfns.requests[3].content).hexdigest(),
    }


def test_a_credential_cannot_register_itself(world: World) -> None:
    with pytest.raises(BadRequest, match="cannot register itself"):
        world.run(lambda flow: flow.register_credential("main", "main", None))
    assert world.dfns.requests == [] and world.store.signatures == 0


def test_register_credential_without_via_picks_another_credential(world: World) -> None:
    answer = world.run(lambda flow: flow.register_credential("main", None, "main again"))
    assert answer.credential["credentialName"] == "main again"


def test_dfnss_refusal_of_the_registration_is_a_dfns_error(world: World) -> None:
    world.dfns.fail["/auth/credentials"] = httpx.Response(409, json={"error": {"message": "already registered"}})
    with pytest.raises(DfnsError) as e:
        world.run(lambda flow: flow.register_credential("new", "ops", None))
    assert e.value.status == 409 and e.value.details["dfns"] == {"message": "already registered"}


def test_dfnss_202_to_the_registration_stays_a_202(world: World) -> None:
    pending = {"id": "ap-1", "status": "Pending"}
    world.dfns.fail["/auth/credentials"] = httpx.Response(202, json=pending)
    answer = world.run(lambda flow: flow.register_credential("new", "ops", None))
    assert answer == Registered(202, pending)


def test_a_registration_answer_nested_too_deep_is_a_dfns_error_not_a_crash(world: World) -> None:
    world.dfns.fail["/auth/credentials"] = httpx.Response(200, content=b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(DfnsError) as e:
        world.run(lambda flow: flow.register_credential("new", "ops", None))
    assert e.value.status == 502 and "no JSON object" in e.value.message
