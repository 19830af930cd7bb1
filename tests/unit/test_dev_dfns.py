"""The local Dfns-compatible server on its own: real HTTP, real keys, clientData signed as the reference says."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.dev.dfns_server import DevDfns, DevDfnsServer, ServiceAccount
from agent.dev.testing import DfnsUser as Client
from agent.dev.testing import PrivateKey, b64url, b64url_decode, client_data, compact, new_key, pem, sign

KINDS = ["ed25519", "p256", "secp256k1", "rsa2048"]
MSG_CHALLENGE = "Challenge token is not valid."
MSG_SIGNATURE = "Unable to verify signature"
MSG_UA = "user action signature is missing or invalid"
MSG_UA_USED = "user action has already been used"


_KEYS: dict[str, PrivateKey] = {}


def assert_error(resp: httpx.Response, status: int, message: str | None = None) -> dict[str, Any]:
    """Every error is the Dfns envelope {"error": {"id", "status", "message"}} served as JSON."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"id", "status", "message"}
    assert err["status"] == status
    assert isinstance(err["id"], str) and err["id"]
    assert isinstance(err["message"], str) and err["message"]
    if message is not None:
        assert err["message"] == message
    return dict(err)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_760_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dfns(clock: FakeClock) -> DevDfns:
    return DevDfns(challenge_ttl=60.0, user_action_ttl=30.0, clock=clock)


@pytest.fixture
def base_url(dfns: DevDfns) -> Iterator[str]:
    with DevDfnsServer(dfns) as server:
        yield server.url


@pytest.fixture
def make_client(dfns: DevDfns, base_url: str) -> Iterator[Any]:
    clients: list[Client] = []

    def make(kind: str = "ed25519", name: str | None = None, cred_id: str | None = None) -> Client:
        key = new_key(kind)
        account = dfns.create_service_account(name or f"sa-{kind}-{len(clients)}", pem(key), cred_id=cred_id)
        client = Client(base_url, account, key)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.http.close()


@pytest.fixture
def client(make_client: Any) -> Client:
    c: Client = make_client("p256")
    return c


# ------------------------------------------------------------------------------------------------------
# The happy path


@pytest.mark.parametrize("kind", KINDS)
def test_full_flow_creates_wallet(kind: str, make_client: Any, dfns: DevDfns) -> None:
    c: Client = make_client(kind, cred_id=b64url(f"ci-test-{kind}".encode()))
    body = {"network": "EthereumSepolia", "name": "treasury"}
    payload = compact(body)
    challenge = c.init("POST", "/wallets", payload)
    assert b64url_decode(challenge["challenge"]).startswith(b"ch-")
    assert "=" not in challenge["challenge"]
    assert len(challenge["challengeIdentifier"].split(".")) == 3
    assert challenge["allowCredentials"] == {
        "key": [{"type": "public-key", "id": c.cred_id}],
        "webauthn": [],
        "passwordProtectedKey": [],
    }
    assert challenge["supportedCredentialKinds"] == [{"kind": "Key", "factor": "first", "requiresSecondFactor": False}]
    assert challenge["userVerification"] == "required"
    assert challenge["attestation"] == "none" and challenge["externalAuthenticationUrl"] == ""

    resp = c.complete(challenge)
    assert resp.status_code == 200, resp.text
    ua = resp.json()["userAction"]
    assert isinstance(ua, str) and ua

    resp = c.http.post("/wallets", content=payload, headers={"X-DFNS-USERACTION": ua})
    assert resp.status_code == 200, resp.text
    wallet = resp.json()
    assert wallet["id"].startswith("wa-")
    assert wallet["network"] == "EthereumSepolia" and wallet["name"] == "treasury" and wallet["status"] == "Active"
    assert wallet["address"].startswith("0x") and len(bytes.fromhex(wallet["address"][2:])) == 20
    assert wallet["dateCreated"].endswith("Z")

    assert c.http.get("/wallets").json() == {"items": [wallet]}
    assert c.http.get(f"/wallets/{wallet['id']}").json() == wallet

    assert {"method": "POST", "path": "/wallets", "user_action": True} in dfns.requests
    log = json.dumps(dfns.requests)
    assert c.account.token not in log and ua not in log


@pytest.mark.parametrize(
    "make_data",
    [
        pytest.param(lambda ch: compact({"type": "key.get", "challenge": ch}).encode(), id="ts-order"),
        pytest.param(
            lambda ch: compact(
                {"type": "key.get", "challenge": ch, "origin": "https://app.dfns.io", "crossOrigin": False}
            ).encode(),
            id="python-sdk",
        ),
        pytest.param(
            lambda ch: json.dumps({"challenge": ch, "crossOrigin": False, "type": "key.get"}).encode(), id="spaces"
        ),
    ],
)
def test_client_data_variants_of_the_official_sdks_are_accepted(client: Client, make_data: Any) -> None:
    challenge = client.init("POST", "/wallets", "{}")
    assert client.complete(challenge, data=make_data(challenge["challenge"])).status_code == 200


def test_padded_base64url_is_accepted(client: Client) -> None:
    challenge = client.init("POST", "/wallets", "{}")
    data = client_data(challenge["challenge"])
    assertion = {
        "credId": client.cred_id,
        "clientData": base64.urlsafe_b64encode(data).decode(),
        "signature": base64.urlsafe_b64encode(sign(client.key, data)).decode(),
    }
    resp = client.http.post(
        "/auth/action",
        json={
            "challengeIdentifier": challenge["challengeIdentifier"],
            "firstFactor": {"kind": "Key", "credentialAssertion": assertion},
        },
    )
    assert resp.status_code == 200, resp.text


# ------------------------------------------------------------------------------------------------------
# Signature checks


@pytest.mark.parametrize("kind", ["p256", "secp256k1"])
def test_raw_r_s_ecdsa_signature_is_rejected(kind: str, make_client: Any) -> None:
    c: Client = make_client(kind)
    challenge = c.init("POST", "/wallets", "{}")
    data = client_data(challenge["challenge"])
    der = sign(c.key, data)
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert_error(c.complete(challenge, data=data, signature=raw), 401, MSG_SIGNATURE)
    # The challenge was spent by the failed attempt: even a good signature cannot use it now.
    assert_error(c.complete(challenge, data=data, signature=der), 400, MSG_CHALLENGE)


def test_wrong_key_signature_is_rejected(client: Client) -> None:
    challenge = client.init("POST", "/wallets", "{}")
    assert_error(client.complete(challenge, key=new_key("p256")), 401, MSG_SIGNATURE)


def test_unknown_or_foreign_cred_id_is_rejected(make_client: Any) -> None:
    a: Client = make_client("ed25519")
    b: Client = make_client("ed25519")
    challenge = a.init("POST", "/wallets", "{}")
    assert_error(a.complete(challenge, key=b.key, cred_id=b.cred_id), 401, MSG_SIGNATURE)
    challenge = a.init("POST", "/wallets", "{}")
    assert_error(a.complete(challenge, cred_id=b64url(b"ci-nope")), 401, MSG_SIGNATURE)


def test_tampered_client_data_is_rejected(client: Client) -> None:
    other = client.init("POST", "/wallets", "{}")
    challenge = client.init("POST", "/wallets", "{}")
    # Signed properly, but for another challenge.
    assert_error(client.complete(challenge, data=client_data(other["challenge"])), 401, MSG_SIGNATURE)
    # Signed properly, but a registration clientData.
    challenge = client.init("POST", "/wallets", "{}")
    assert_error(client.complete(challenge, data=client_data(challenge["challenge"], "key.create")), 401, MSG_SIGNATURE)
    # The signature covers other bytes than the clientData sent (re-serialised with spaces).
    challenge = client.init("POST", "/wallets", "{}")
    signed = client_data(challenge["challenge"])
    sent = json.dumps({"challenge": challenge["challenge"], "type": "key.get"}).encode()
    assert sent != signed
    assert_error(client.complete(challenge, data=sent, signature=sign(client.key, signed)), 401, MSG_SIGNATURE)


def test_challenge_is_single_use_and_per_user(make_client: Any) -> None:
    a: Client = make_client("ed25519")
    b: Client = make_client("ed25519")
    challenge = a.init("POST", "/wallets", "{}")
    assert a.complete(challenge).status_code == 200
    assert_error(a.complete(challenge), 400, MSG_CHALLENGE)

    foreign = a.init("POST", "/wallets", "{}")
    assert_error(b.complete(foreign), 400, MSG_CHALLENGE)
    assert_error(b.complete({**foreign, "challengeIdentifier": "eyJ.eyJ.sig"}), 400, MSG_CHALLENGE)


# ------------------------------------------------------------------------------------------------------
# User-action enforcement


def test_user_action_is_single_use(client: Client) -> None:
    ua = client.user_action("POST", "/wallets", '{"network":"Bitcoin"}')
    assert client.call("POST", "/wallets", {"network": "Bitcoin"}, ua=ua).status_code == 200
    assert_error(client.call("POST", "/wallets", {"network": "Bitcoin"}, ua=ua), 400, MSG_UA_USED)
    assert len(client.http.get("/wallets").json()["items"]) == 1


def test_user_action_is_bound_to_path_method_and_payload(client: Client) -> None:
    wallet = client.call("POST", "/wallets", {"network": "Bitcoin"}).json()
    body = {"network": "Bitcoin"}
    ua = client.user_action("POST", "/wallets", compact(body))
    transfers = f"/wallets/{wallet['id']}/transfers"
    transfer = {"kind": "Native", "to": "0xabc", "amount": "1"}
    assert_error(client.call("POST", transfers, transfer, ua=ua), 403, MSG_UA)  # another path
    assert_error(client.call("PUT", "/wallets", body, ua=ua), 405)  # no such route for PUT
    ua_put = client.user_action("PUT", "/auth/credentials/deactivate", "{}")
    assert_error(client.call("POST", "/auth/credentials/deactivate", {}, ua=ua_put), 405)
    cred_uuid = client.account.credential_uuid
    ua_post = client.user_action("POST", "/auth/credentials/deactivate", compact({"credentialUuid": cred_uuid}))
    assert_error(client.call("PUT", "/auth/credentials/deactivate", {"credentialUuid": cred_uuid}, ua=ua_post), 403)
    assert_error(client.call("POST", "/wallets", {"network": "Ethereum"}, ua=ua), 403, MSG_UA)  # other payload
    assert_error(client.call("POST", "/wallets", {"network": "Bitcoin", "name": "x"}, ua=ua), 403, MSG_UA)
    # Failed checks do not spend it: the call it was made for still goes through, once (a query string is not
    # part of the signed path, as the TS/Python/Java SDKs sign it).
    assert client.call("POST", "/wallets?x=1", body, ua=ua).status_code == 200
    assert_error(client.call("POST", "/wallets", body, ua=ua), 400, MSG_UA_USED)


def test_user_action_of_another_user_is_rejected(make_client: Any) -> None:
    a: Client = make_client("ed25519")
    b: Client = make_client("ed25519")
    ua = a.user_action("POST", "/wallets", '{"network":"Bitcoin"}')
    assert_error(b.call("POST", "/wallets", {"network": "Bitcoin"}, ua=ua), 403, MSG_UA)


def test_payload_compared_semantically(client: Client) -> None:
    ua = client.user_action("POST", "/wallets", '{"network": "Bitcoin",  "name": "w"}')
    resp = client.call("POST", "/wallets", content=b'{"name":"w","network":"Bitcoin"}', ua=ua)
    assert resp.status_code == 200, resp.text
    wallet = resp.json()
    ua = client.user_action("POST", f"/wallets/{wallet['id']}/transfers", '{"kind":"Native","to":"a","amount":"1"}')
    resp = client.call(
        "POST", f"/wallets/{wallet['id']}/transfers", content=b'{"amount":"1","to":"a","kind":"Native"}', ua=ua
    )
    assert resp.status_code == 200, resp.text


def test_payload_json_types_are_not_conflated(client: Client) -> None:
    ua = client.user_action("POST", "/wallets", '{"network":"Bitcoin","name":"1"}')
    assert_error(client.call("POST", "/wallets", content=b'{"network":"Bitcoin","name":1}', ua=ua), 403, MSG_UA)


def test_missing_user_action_on_mutation(client: Client) -> None:
    assert_error(client.http.post("/wallets", json={"network": "Bitcoin"}), 403, MSG_UA)
    assert_error(client.http.post("/wallets", json={"network": "Bitcoin"}, headers={"X-DFNS-USERACTION": "x"}), 403)
    assert client.http.get("/wallets").json() == {"items": []}


def test_get_needs_no_user_action(client: Client, dfns: DevDfns) -> None:
    for path in ("/wallets", "/auth/credentials", "/auth/service-accounts"):
        resp = client.http.get(path)
        assert resp.status_code == 200, resp.text
        assert isinstance(resp.json()["items"], list)
    creds = client.http.get("/auth/credentials").json()["items"]
    assert [(c["credentialId"], c["isActive"], c["kind"]) for c in creds] == [(client.cred_id, True, "Key")]
    assert {"method": "GET", "path": "/wallets", "user_action": False} in dfns.requests


@pytest.mark.parametrize(("payload", "content"), [("{}", b""), ("", b""), ("{}", b"{}"), ("", b"{}")])
def test_bodyless_deactivate(payload: str, content: bytes, make_client: Any) -> None:
    admin: Client = make_client("ed25519")
    target: Client = make_client("p256")
    assert target.http.get("/wallets").status_code == 200
    path = f"/auth/service-accounts/{target.account.user_id}/deactivate"
    ua = admin.user_action("PUT", path, payload)
    resp = admin.http.put(path, content=content, headers={"X-DFNS-USERACTION": ua})
    assert resp.status_code == 200, resp.text
    assert resp.json()["userInfo"]["isActive"] is False
    assert_error(target.http.get("/wallets"), 401)
    assert admin.http.get("/wallets").status_code == 200


# ------------------------------------------------------------------------------------------------------
# Authentication and generic errors


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}],
    ids=["none", "unknown", "basic", "empty"],
)
def test_bad_bearer_is_401(headers: dict[str, str], base_url: str, client: Client) -> None:
    with httpx.Client(base_url=base_url, headers=headers) as http:
        assert_error(http.get("/wallets"), 401)
        assert_error(
            http.post(
                "/auth/action/init",
                json={"userActionHttpMethod": "POST", "userActionHttpPath": "/wallets", "userActionPayload": "{}"},
            ),
            401,
        )
    assert client.http.get("/wallets").status_code == 200


def test_routing_and_body_errors_use_the_envelope(client: Client) -> None:
    assert_error(client.http.get("/nope"), 404)
    assert_error(client.http.get("/wallets/wa-unknown"), 404)
    assert_error(client.http.delete("/wallets"), 405)
    assert_error(client.http.post("/auth/action/init", content=b"{not json"), 400)
    assert_error(client.http.post("/auth/action/init", content=b"[1,2]"), 400)


@pytest.mark.parametrize(
    "body",
    [
        {"userActionHttpMethod": "post", "userActionHttpPath": "/wallets", "userActionPayload": "{}"},
        {"userActionHttpMethod": "POST", "userActionHttpPath": "wallets", "userActionPayload": "{}"},
        {"userActionHttpMethod": "POST", "userActionHttpPath": "/wallets?x=1", "userActionPayload": "{}"},
        {"userActionHttpMethod": "POST", "userActionHttpPath": "/wallets", "userActionPayload": {}},
        {
            "userActionHttpMethod": "POST",
            "userActionHttpPath": "/wallets",
            "userActionPayload": "{}",
            "userActionServerKind": "X",
        },
    ],
)
def test_action_init_validation(body: dict[str, Any], client: Client) -> None:
    assert_error(client.http.post("/auth/action/init", json=body), 400)


def test_action_body_validation(client: Client) -> None:
    challenge = client.init("POST", "/wallets", "{}")
    resp = client.http.post(
        "/auth/action",
        json={"challengeIdentifier": challenge["challengeIdentifier"], "firstFactor": {"kind": "Fido2"}},
    )
    assert_error(resp, 400)
    assert_error(client.http.post("/auth/action", json={}), 400, MSG_CHALLENGE)


# ------------------------------------------------------------------------------------------------------
# Credentials


def test_register_credential_then_it_signs(client: Client) -> None:
    new = new_key("ed25519")
    cred_id = b64url(b"hsm-key-label-1")
    resp = client.register(new, cred_id)
    assert resp.status_code == 200, resp.text
    cred = resp.json()
    assert cred["kind"] == "Key" and cred["credentialId"] == cred_id and cred["isActive"] is True
    assert cred["credentialUuid"].startswith("cr-") and cred["publicKey"] == pem(new)
    assert cred["relyingPartyId"] == "dfns.local" and cred["origin"] == "http://localhost"
    listed = client.http.get("/auth/credentials").json()["items"]
    assert {c["credentialId"] for c in listed} == {client.cred_id, cred_id}

    challenge = client.init("POST", "/wallets", '{"network":"Bitcoin"}')
    assert {k["id"] for k in challenge["allowCredentials"]["key"]} == {client.cred_id, cred_id}
    resp = client.complete(challenge, key=new, cred_id=cred_id)
    assert resp.status_code == 200, resp.text
    ua = resp.json()["userAction"]
    assert client.call("POST", "/wallets", {"network": "Bitcoin"}, ua=ua).status_code == 200


@pytest.mark.parametrize("kind", KINDS)
def test_register_credential_every_key_type(kind: str, client: Client) -> None:
    resp = client.register(new_key(kind), b64url(f"new-{kind}".encode()))
    assert resp.status_code == 200, resp.text


def test_register_credential_bad_attestation_signature(client: Client) -> None:
    assert_error(client.register(new_key("p256"), b64url(b"bad"), bad_signature=True), 401, MSG_SIGNATURE)
    assert [c["credentialId"] for c in client.http.get("/auth/credentials").json()["items"]] == [client.cred_id]


def test_register_credential_reused_cred_id_is_409(client: Client) -> None:
    assert client.register(new_key("ed25519"), b64url(b"dup")).status_code == 200
    assert_error(client.register(new_key("ed25519"), b64url(b"dup")), 409)
    assert_error(client.register(new_key("ed25519"), client.cred_id), 409)


def test_register_credential_rejects_wrong_client_data(client: Client) -> None:
    challenge = client.http.post("/auth/credentials/init", json={"kind": "Key"}).json()
    assert challenge["kind"] == "Key" and challenge["attestation"] == "none" and challenge["rp"] is None
    assert challenge["user"]["id"] == client.account.user_id
    new = new_key("ed25519")
    data = client_data(challenge["challenge"], "key.get")  # wrong type
    fingerprint = compact({"clientDataHash": hashlib.sha256(data).hexdigest(), "publicKey": pem(new)}).encode()
    attestation = compact({"publicKey": pem(new), "signature": sign(new, fingerprint).hex()}).encode()
    body = {
        "credentialKind": "Key",
        "credentialInfo": {"credId": "abc", "clientData": b64url(data), "attestationData": b64url(attestation)},
        "credentialName": "x",
        "challengeIdentifier": challenge["challengeIdentifier"],
    }
    assert_error(client.call("POST", "/auth/credentials", body), 401, MSG_SIGNATURE)
    assert_error(client.call("POST", "/auth/credentials", body), 400, MSG_CHALLENGE)  # challenge spent


def test_deactivated_credential_is_no_longer_allowed(client: Client) -> None:
    new = new_key("rsa2048")
    new_id = b64url(b"rotated")
    assert client.register(new, new_id).status_code == 200
    old_id, old_key = client.cred_id, client.key
    client.key, client.cred_id = new, new_id  # sign from now on with the new credential
    body = {"credentialUuid": client.account.credential_uuid}
    assert client.call("PUT", "/auth/credentials/deactivate", body).status_code == 200

    challenge = client.init("POST", "/wallets", "{}")
    assert challenge["allowCredentials"]["key"] == [{"type": "public-key", "id": new_id}]
    assert_error(client.complete(challenge, key=old_key, cred_id=old_id), 401, MSG_SIGNATURE)
    listed = {c["credentialId"]: c["isActive"] for c in client.http.get("/auth/credentials").json()["items"]}
    assert listed == {old_id: False, new_id: True}

    assert client.call("PUT", "/auth/credentials/activate", body).status_code == 200
    challenge = client.init("POST", "/wallets", "{}")
    assert client.complete(challenge, key=old_key, cred_id=old_id).status_code == 200


# ------------------------------------------------------------------------------------------------------
# Service accounts and wallets


def test_create_service_account_then_its_token_works(client: Client, base_url: str) -> None:
    key = new_key("secp256k1")
    body = {"name": "ci-bot", "publicKey": pem(key), "daysValid": 30, "externalId": "ext-1"}
    resp = client.call("POST", "/auth/service-accounts", body)
    assert resp.status_code == 200, resp.text
    created = resp.json()
    info, token = created["userInfo"], created["accessTokens"][0]
    assert info["userId"].startswith("us-") and info["credentialUuid"].startswith("cr-")
    assert info["isServiceAccount"] is True and info["isActive"] is True and info["name"] == "ci-bot"
    assert token["tokenId"].startswith("to-") and token["isActive"] is True and token["publicKey"] == pem(key)
    assert b64url_decode(token["credId"]).startswith(b"ci-")

    account = ServiceAccount(info["userId"], "ci-bot", token["accessToken"], token["credId"], info["credentialUuid"])
    bot = Client(base_url, account, key)
    try:
        assert bot.http.get("/wallets").status_code == 200
        resp = bot.call("POST", "/wallets", {"network": "Ethereum"})
        assert resp.status_code == 200, resp.text
        assert client.http.get("/wallets").json() == {"items": []}  # wallets are the caller's own
    finally:
        bot.http.close()

    assert_error(client.call("POST", "/auth/service-accounts", {"name": "ci-bot", "publicKey": pem(key)}), 409)
    assert_error(client.call("POST", "/auth/service-accounts", {"name": "x", "publicKey": "not a pem"}), 400)
    listed = client.http.get("/auth/service-accounts").json()["items"]
    assert {i["userInfo"]["name"] for i in listed} == {"ci-bot", client.account.name}
    assert all("accessToken" not in t for i in listed for t in i["accessTokens"])
    assert token["accessToken"] not in json.dumps(listed)


def test_transfers_and_policy_202(client: Client) -> None:
    wallet = client.call("POST", "/wallets", {"network": "EthereumSepolia"}).json()
    path = f"/wallets/{wallet['id']}/transfers"
    small = {"kind": "Native", "to": "0x" + "11" * 20, "amount": "1000000"}
    resp = client.call("POST", path, small)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "Broadcasted" and resp.json()["requestBody"] == small
    assert resp.json()["id"].startswith("xfr-") and resp.json()["walletId"] == wallet["id"]

    large = {**small, "amount": "1000001"}
    resp = client.call("POST", path, large)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "PendingApproval" and resp.json()["requestBody"] == large

    for bad in ({**small, "amount": "1.5"}, {**small, "amount": 5}, {**small, "kind": "Erc20"}, {"kind": "Native"}):
        assert_error(client.call("POST", path, bad), 400)
    assert_error(client.call("POST", "/wallets/wa-nope/transfers", small), 404)
    assert_error(client.call("POST", "/wallets", {"network": ""}), 400)


# ------------------------------------------------------------------------------------------------------
# Faults and expiry


def test_inject_fault_429_once_then_normal(client: Client, dfns: DevDfns) -> None:
    dfns.inject_fault("/auth/action/init", status=429)
    resp = client.http.post(
        "/auth/action/init",
        json={"userActionHttpMethod": "POST", "userActionHttpPath": "/wallets", "userActionPayload": "{}"},
    )
    assert_error(resp, 429, "exceeded the API rate limits")
    assert client.init("POST", "/wallets", "{}")["challenge"]


def test_inject_fault_custom_body_method_and_times(client: Client, dfns: DevDfns) -> None:
    dfns.inject_fault("/wallets", method="GET", status=503, body={"oops": True}, times=2)
    assert client.http.post("/wallets", json={}).status_code == 403  # POST is not matched
    for _ in range(2):
        resp = client.http.get("/wallets")
        assert resp.status_code == 503 and resp.json() == {"oops": True}
    assert client.http.get("/wallets").status_code == 200
    dfns.inject_fault("/wallets", status=500)
    assert_error(client.http.get("/wallets?limit=1"), 500)  # the query is not part of the matched path


def test_inject_fault_delay(client: Client, dfns: DevDfns) -> None:
    dfns.inject_fault("/wallets", delay=0.6)
    with pytest.raises(httpx.ReadTimeout):
        client.http.get("/wallets", timeout=0.2)
    dfns.inject_fault("/wallets", delay=0.3)
    start = time.monotonic()
    resp = client.http.get("/wallets")
    assert resp.status_code == 200  # delayed, then handled normally
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    assert client.http.get("/wallets").status_code == 200
    assert time.monotonic() - start < 0.3


def test_challenge_expires(client: Client, clock: FakeClock) -> None:
    challenge = client.init("POST", "/wallets", "{}")
    clock.now += 61
    assert_error(client.complete(challenge), 400, MSG_CHALLENGE)
    challenge = client.init("POST", "/wallets", "{}")
    clock.now += 59
    assert client.complete(challenge).status_code == 200
    claims = json.loads(b64url_decode(challenge["challengeIdentifier"].split(".")[1]))
    assert claims["exp"] == int(clock.now - 59 + 60)


def test_user_action_expires(client: Client, clock: FakeClock) -> None:
    ua = client.user_action("POST", "/wallets", '{"network":"Bitcoin"}')
    clock.now += 31
    assert_error(client.call("POST", "/wallets", {"network": "Bitcoin"}, ua=ua), 403, MSG_UA)


def test_create_service_account_validates() -> None:
    dfns = DevDfns()
    key = new_key("ed25519")
    sa = dfns.create_service_account("a", pem(key))
    assert sa.user_id.startswith("us-") and sa.credential_uuid.startswith("cr-")
    assert b64url_decode(sa.cred_id).startswith(b"ci-") and sa.token
    with pytest.raises(ValueError):
        dfns.create_service_account("a", pem(new_key("ed25519")))
    with pytest.raises(ValueError):
        dfns.create_service_account("b", pem(new_key("ed25519")), cred_id=sa.cred_id)
    with pytest.raises(ValueError):
        dfns.create_service_account("c", pem(ec.generate_private_key(ec.SECP384R1())))


# ------------------------------------------------------------------------------------------------------
# The CLI entry point


# ------------------------------------------------------------------------------------------------------
# Logging


def test_malformed_requests_are_one_debug_line_not_an_error_with_a_traceback(
    base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's own log filter (agent/dev, not agent/logs.py) keeps a client's garbage out of ERROR."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"NOT A REQUEST\x00\r\n\r\n")
            assert s.recv(4096).split(b" ", 2)[1] == b"400"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(r.name == "aiohttp.server" for r in caplog.records):
            time.sleep(0.01)
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert server, "aiohttp logged nothing about the malformed request"
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in server), server
    assert all(r.getMessage().startswith("bad request: ") for r in server)
