"""The signing service in process: a :class:`SoftKeyStore` for the token and a real audit log in
``tmp_path`` (the same service over SoftHSM and a running agent is in ``tests/device/``).

Signatures are checked with ``cryptography`` directly against the store's private keys, not only with
``agent.dfns.verify``, so a bug shared by the signer and the agent's verifier cannot hide.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from agent.caller import Caller
from agent.config import CredentialConfig
from agent.core.audit import AuditLog, verify
from agent.core.metrics import Metrics
from agent.core.policy import UNRESTRICTED, Grant
from agent.core.records import Action
from agent.core.service import SigningService
from agent.core.signing_threads import SigningThreads
from agent.dev.softkeys import SoftKeyStore
from agent.dev.testing import b64url, b64url_decode, files_cannot_grow_past, make_challenge, samples_of, total
from agent.dfns import KeyAssertion, RegistrationChallenge, verify_signature
from agent.errors import (
    AuditUnavailable,
    BadRequest,
    CircuitOpen,
    ConfigError,
    CredentialNotAllowed,
    Forbidden,
    TokenUnavailable,
    UnknownCredential,
)
from agent.health import AgentHealth, TokenState
from agent.token.keys import KeyKind

KINDS = list(KeyKind)
CALLER = Caller(uid=1234, gid=1234, pid=4321, exe="/usr/bin/python3")
ORIGIN = "https://app.dfns.io"


def label(kind: KeyKind) -> str:
    return f"key-{kind.value}"


def cred_id(kind: KeyKind) -> str:
    return b64url(f"cred-{kind.value}".encode())


def new_store() -> SoftKeyStore:
    return SoftKeyStore.with_keys([(label(k), k) for k in KINDS])


def configs(origin: str | None = None) -> list[CredentialConfig]:
    """One credential per kind, named after the kind, in KeyKind order."""
    return [CredentialConfig(name=k.value, key=label(k), cred_id=cred_id(k), origin=origin) for k in KINDS]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def fingerprint_of(store: SoftKeyStore, kind: KeyKind) -> str:
    spki = (
        store.private_key(label(kind))
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def check_signature(store: SoftKeyStore, kind: KeyKind, signature: bytes, message: bytes) -> None:
    """Verify as Dfns does (§3), with cryptography and the private key's own public half; raises if bad."""
    public = store.private_key(label(kind)).public_key()
    if kind is KeyKind.ED25519:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        assert len(signature) == 64
        public.verify(signature, message)
    elif kind in (KeyKind.P256, KeyKind.SECP256K1):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        r, s = decode_dss_signature(signature)
        assert encode_dss_signature(r, s) == signature, "ECDSA signature is not strict DER"
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert len(signature) == public.key_size // 8
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


class World:
    """A service over a fresh SoftKeyStore, with its audit log and metrics."""

    def __init__(self, tmp_path: Path, *, origin: str | None = None, threads: SigningThreads | None = None):
        self.store = new_store()
        self.audit_path = tmp_path / "audit" / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.metrics = Metrics()
        self.service = SigningService.from_config(self.store, configs(origin), self.audit, self.metrics, threads)

    def samples(self) -> dict[Any, float]:
        return samples_of(self.metrics.render()[0].decode())

    def signatures(self, **labels: str) -> float:
        return total(self.samples(), "dfns_agent_signatures_total", **labels)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.audit.close()


# -- signatures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [None, ORIGIN], ids=["no-origin", "origin"])
@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_signature_verifies_for_every_key_kind_and_both_client_data_forms(
    tmp_path: Path, kind: KeyKind, origin: str | None
) -> None:
    w = World(tmp_path, origin=origin)
    try:
        challenge = make_challenge(cred_id(kind))
        assertion = asyncio.run(w.service.sign(challenge, kind.value, caller=CALLER))
    finally:
        w.audit.close()
    first = assertion.to_json()
    assert first["kind"] == "Key"
    sent = first["credentialAssertion"]
    assert set(sent) == {"credId", "clientData", "signature"}
    assert sent["credId"] == cred_id(kind)
    assert "=" not in sent["clientData"] and "=" not in sent["signature"]
    data = b64url_decode(sent["clientData"])
    c = challenge["challenge"]
    if origin is None:
        assert data == f'{{"challenge":"{c}","type":"key.get"}}'.encode()
    else:
        assert data == f'{{"type":"key.get","challenge":"{c}","origin":"{origin}","crossOrigin":false}}'.encode()
    signature = b64url_decode(sent["signature"])
    check_signature(w.store, kind, signature, data)
    info = w.store.find_key(label(kind))
    assert info.public_key is not None and verify_signature(info.public_key, signature, data)
    assert not verify_signature(info.public_key, signature, data + b" ")


def test_register_attests_the_new_key_over_key_create_client_data(world: World) -> None:
    challenge = {"challenge": b64url(b"reg-challenge-1"), "challengeIdentifier": "reg-id", "kind": "Key"}
    registration = asyncio.run(
        world.service.register(challenge, "p256", cred_id="new-cred", credential_name="rotated", caller=CALLER)
    )
    body = registration.to_json()
    assert body["credentialKind"] == "Key" and body["credentialName"] == "rotated"
    assert body["challengeIdentifier"] == "reg-id"
    info = body["credentialInfo"]
    assert info["credId"] == "new-cred"
    data = b64url_decode(info["clientData"])
    assert json.loads(data) == {"challenge": challenge["challenge"], "type": "key.create"}
    attestation = json.loads(b64url_decode(info["attestationData"]))
    pem = world.store.find_key(label(KeyKind.P256)).public_pem
    assert attestation["publicKey"] == pem
    fingerprint = json.dumps(
        {"clientDataHash": hashlib.sha256(data).hexdigest(), "publicKey": pem}, separators=(",", ":")
    ).encode()
    check_signature(world.store, KeyKind.P256, bytes.fromhex(attestation["signature"]), fingerprint)
    [rec] = records(world.audit_path)
    assert rec["event"] == "register" and rec["outcome"] == "ok"
    assert rec["credential"] == "p256" and rec["credId"] == "new-cred"
    assert rec["clientDataSha256"] == hashlib.sha256(data).hexdigest()
    assert RegistrationChallenge.parse(challenge).challenge == rec["challenge"]


# -- the audit record -------------------------------------------------------------------------------


def test_audit_record_is_complete_and_durable_when_sign_returns(world: World) -> None:
    challenge = make_challenge(cred_id(KeyKind.ED25519), cred_id(KeyKind.P256))
    action = Action("POST", "/wallets", hashlib.sha256(b"{}").hexdigest())

    async def sign_and_read() -> tuple[KeyAssertion, list[dict[str, Any]]]:
        assertion = await world.service.sign(challenge, "p256", caller=CALLER, action=action)
        return assertion, records(world.audit_path)  # read before anything else can run

    assertion, found = asyncio.run(sign_and_read())
    [rec] = found
    sent = assertion.to_json()["credentialAssertion"]
    assert rec["event"] == "sign" and rec["outcome"] == "ok"
    assert rec["caller"] == {"uid": 1234, "gid": 1234, "pid": 4321, "exe": "/usr/bin/python3"}
    assert rec["credential"] == "p256"
    assert rec["credId"] == cred_id(KeyKind.P256)
    assert rec["keyFingerprint"] == fingerprint_of(world.store, KeyKind.P256)
    assert rec["clientDataSha256"] == hashlib.sha256(b64url_decode(sent["clientData"])).hexdigest()
    assert rec["signature"] == sent["signature"]
    assert rec["challenge"] == challenge["challenge"]
    assert rec["challengeIdentifierSha256"] == hashlib.sha256(challenge["challengeIdentifier"].encode()).hexdigest()
    assert rec["action"] == {"method": "POST", "path": "/wallets", "payloadSha256": action.payload_sha256}
    assert rec["agentPid"] == os.getpid()
    assert rec["seq"] == 1 and rec["latencyMs"] >= 0
    # The record's own facts check the signature: rebuild clientData, verify with the fingerprinted key.
    rebuilt = f'{{"challenge":"{rec["challenge"]}","type":"key.get"}}'.encode()
    assert hashlib.sha256(rebuilt).hexdigest() == rec["clientDataSha256"]
    check_signature(world.store, KeyKind.P256, b64url_decode(rec["signature"]), rebuilt)
    assert verify(world.audit_path).ok


def test_the_chain_verifies_across_signatures_and_refusals_and_breaks_when_edited(world: World) -> None:
    async def many() -> None:
        for kind in KINDS:
            await world.service.sign(make_challenge(cred_id(kind)), kind.value, caller=CALLER)
        with pytest.raises(UnknownCredential):
            await world.service.sign(make_challenge(cred_id(KeyKind.P256)), "nope", caller=CALLER)
        await world.service.audit_refusal(CALLER, "/v1/sign", Forbidden("no", rule="r"), credential="p256")

    asyncio.run(many())
    result = verify(world.audit_path)
    assert result.ok and result.records == len(KINDS) + 2
    lines = world.audit_path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"outcome":"ok"', b'"outcome":"no"')
    world.audit_path.write_bytes(b"".join(lines))
    broken = verify(world.audit_path)
    assert not broken.ok and broken.first_bad_line == 4


def test_refusals_are_recorded_with_their_outcome_and_bad_requests_without_a_credential_are_not(
    world: World,
) -> None:
    only_ed = make_challenge(cred_id(KeyKind.ED25519))

    async def refused() -> list[int]:
        statuses = []
        for credential, grant, error in [
            ("nope", UNRESTRICTED, UnknownCredential),
            ("p256", UNRESTRICTED, CredentialNotAllowed),
            ("ed25519", Grant(rule="only-p256", credentials=frozenset({"p256"})), Forbidden),
        ]:
            with pytest.raises(error) as e:
                await world.service.sign(only_ed, credential, caller=CALLER, grant=grant)
            statuses.append(e.value.status)
        with pytest.raises(BadRequest):
            await world.service.sign({"challenge": "not base64url!"}, None, caller=CALLER)
        with pytest.raises(BadRequest):
            await world.service.sign("not an object", None, caller=CALLER)
        return statuses

    assert asyncio.run(refused()) == [404, 422, 403]
    recs = records(world.audit_path)
    assert [(r["event"], r["outcome"], r["code"], r["credential"]) for r in recs] == [
        ("sign", "refused", "unknown_credential", "nope"),
        ("sign", "refused", "credential_not_allowed", "p256"),
        ("sign", "refused", "forbidden", "ed25519"),
    ]
    assert all("signature" not in r and r["caller"]["uid"] == 1234 and r["reason"] for r in recs)
    assert "only-p256" in recs[2]["reason"]
    assert world.store.signatures == 0
    assert verify(world.audit_path).ok


def test_audit_refusal_records_the_endpoint_credential_and_action(world: World) -> None:
    action = Action("DELETE", "/wallets/wa-1")
    asyncio.run(
        world.service.audit_refusal(
            CALLER, "/v1/request", Forbidden("rule 'r' does not allow method DELETE", rule="r"), action=action
        )
    )
    [rec] = records(world.audit_path)
    assert rec["event"] == "refused" and rec["outcome"] == "refused" and rec["code"] == "forbidden"
    assert rec["endpoint"] == "/v1/request" and rec["action"] == {"method": "DELETE", "path": "/wallets/wa-1"}
    assert rec["reason"] == "rule 'r' does not allow method DELETE"


def test_without_an_audit_log_a_flood_of_refusals_is_worth_one_log_line_per_caller_and_reason() -> None:
    """The answer to audit_refusal decides the log level of the refusal's line: with the audit log off, one
    caller hammering refused requests must not write a warning for each of them either."""
    service = SigningService.from_config(new_store(), configs(), None)
    other = Caller(uid=4321, gid=4321, pid=1, exe="/usr/bin/curl")

    async def refusals() -> list[bool]:
        no = Forbidden("rule 'r' does not allow it", rule="r")
        firsts = [await service.audit_refusal(CALLER, "/v1/sign", no, credential="p256") for _ in range(50)]
        firsts.append(await service.audit_refusal(other, "/v1/sign", no, credential="p256"))
        firsts.append(await service.audit_refusal(CALLER, "/v1/sign", Forbidden("another reason", rule="r")))
        return firsts

    firsts = asyncio.run(refusals())
    assert firsts == [True] + [False] * 49 + [True, True]


def test_a_token_failure_is_recorded_as_an_error_and_a_fail_fast_answer_is_not(world: World) -> None:
    challenge = make_challenge(cred_id(KeyKind.P256))
    world.store.fail_next_sign()
    with pytest.raises(TokenUnavailable):
        asyncio.run(world.service.sign(challenge, "p256", caller=CALLER))
    world.store.set_state(TokenState.DEGRADED, "reconnecting")
    with pytest.raises(CircuitOpen):
        asyncio.run(world.service.sign(challenge, "p256", caller=CALLER))
    [rec] = records(world.audit_path)
    assert rec["outcome"] == "error" and rec["code"] == "token_unavailable" and "signature" not in rec
    assert rec["keyFingerprint"] == fingerprint_of(world.store, KeyKind.P256)
    assert world.signatures(credential="p256", outcome="error") == 1
    world.store.set_state(TokenState.OK)
    asyncio.run(world.service.sign(challenge, "p256", caller=CALLER))  # the fault was for one signature only
    assert records(world.audit_path)[-1]["outcome"] == "ok"


# -- fail closed ------------------------------------------------------------------------------------


def test_no_signature_leaves_when_the_audit_log_cannot_write() -> None:
    store = new_store()
    audit = AuditLog(Path("/dev/full"))  # opens, then every write fails with ENOSPC
    metrics = Metrics()
    service = SigningService.from_config(store, configs(), audit, metrics)
    challenge = make_challenge(cred_id(KeyKind.ED25519))
    result: list[KeyAssertion] = []

    async def attempt() -> None:
        result.append(await service.sign(challenge, "ed25519", caller=CALLER))

    try:
        with pytest.raises(AuditUnavailable, match="No space left on device") as e:
            asyncio.run(attempt())
        assert e.value.status == 503 and "withheld" in e.value.message
        assert result == []
        assert store.signatures == 1  # the token signed; the signature was withheld
        samples = samples_of(metrics.render()[0].decode())
        assert total(samples, "dfns_agent_signatures_total", credential="ed25519", outcome="error") == 1
        assert total(samples, "dfns_agent_signatures_total", outcome="ok") == 0
        # A refusal stays the refusal: the caller learns why, not that the log is broken.
        with pytest.raises(UnknownCredential):
            asyncio.run(service.sign(challenge, "nope", caller=CALLER))
        health = asyncio.run(service.health())
        assert health.status is TokenState.DOWN and not health.ok
        assert health.reason is not None and "cannot write audit log /dev/full" in health.reason
    finally:
        audit.close()


# -- picking a credential ---------------------------------------------------------------------------


def test_auto_pick_takes_the_first_allowed_credential_the_grant_permits(world: World) -> None:
    challenge = make_challenge(cred_id(KeyKind.P256), cred_id(KeyKind.ED25519), cred_id(KeyKind.RSA2048))

    async def picks() -> list[str]:
        out = []
        for grant in (
            UNRESTRICTED,
            Grant(rule="r", credentials=frozenset({"p256", "rsa2048"})),
            Grant(rule="r", credentials=frozenset({"rsa2048", "rsa3072"})),
        ):
            assertion = await world.service.sign(challenge, None, caller=CALLER, grant=grant)
            out.append(assertion.cred_id)
        return out

    # Configuration order (ed25519 first), not the challenge's order; never a credential outside the grant.
    assert asyncio.run(picks()) == [cred_id(KeyKind.ED25519), cred_id(KeyKind.P256), cred_id(KeyKind.RSA2048)]
    assert [r["credential"] for r in records(world.audit_path)] == ["ed25519", "p256", "rsa2048"]
    with pytest.raises(CredentialNotAllowed, match="none you may use|rsa3072") as e:
        asyncio.run(
            world.service.sign(
                make_challenge(cred_id(KeyKind.ED25519)),
                None,
                grant=Grant(rule="r", credentials=frozenset({"rsa3072"})),
            )
        )
    assert "ed25519" not in e.value.message.split("the agent has")[1]


# -- where the token work runs ----------------------------------------------------------------------


def test_without_signing_threads_signing_runs_inline_on_the_event_loop(world: World) -> None:
    asyncio.run(world.service.sign(make_challenge(cred_id(KeyKind.P256)), "p256"))
    assert world.store.sign_threads == [threading.current_thread().name]


def test_with_a_thread_pool_concurrent_signatures_run_on_it_and_each_is_audited(tmp_path: Path) -> None:
    with SigningThreads(2, name="signer") as pool:
        w = World(tmp_path, threads=pool)
        try:
            challenges = [(make_challenge(cred_id(k)), k) for k in KINDS for _ in range(4)]

            async def all_at_once() -> list[KeyAssertion]:
                return list(await asyncio.gather(*(w.service.sign(c, k.value, caller=CALLER) for c, k in challenges)))

            assertions = asyncio.run(all_at_once())
            health = asyncio.run(w.service.health())  # health runs on the pool too
        finally:
            w.audit.close()
    assert len(w.store.sign_threads) == len(challenges)
    assert all(name.startswith("signer") for name in w.store.sign_threads)
    for assertion, (challenge, kind) in zip(assertions, challenges, strict=True):
        assert json.loads(assertion.client_data.raw)["challenge"] == challenge["challenge"]
        check_signature(w.store, kind, assertion.signature, assertion.client_data.raw)
    recs = records(w.audit_path)
    assert verify(w.audit_path).records == len(challenges)
    assert sorted(r["signature"] for r in recs) == sorted(b64url(a.signature) for a in assertions)
    assert health.ok and len(w.store.sign_threads) == len(challenges)
    assert w.signatures(outcome="ok") == len(challenges)


# -- metrics ----------------------------------------------------------------------------------------


def test_metrics_count_each_outcome_per_credential_and_time_only_successes(world: World) -> None:
    p256 = make_challenge(cred_id(KeyKind.P256))

    async def mixed() -> None:
        for _ in range(3):
            await world.service.sign(p256, "p256")
        await world.service.sign(make_challenge(cred_id(KeyKind.ED25519)), "ed25519")
        with pytest.raises(CredentialNotAllowed):
            await world.service.sign(p256, "ed25519")
        with pytest.raises(UnknownCredential):
            await world.service.sign(p256, "nope")
        world.store.fail_next_sign()
        with pytest.raises(TokenUnavailable):
            await world.service.sign(p256, "p256")
        with pytest.raises(BadRequest):  # no credential reached: not counted
            await world.service.sign({}, None)
        world.store.set_state(TokenState.DEGRADED, "reconnecting")
        with pytest.raises(CircuitOpen):  # fail-fast while recovering: not counted
            await world.service.sign(p256, "p256")

    asyncio.run(mixed())
    s = world.samples()
    count = total
    assert count(s, "dfns_agent_signatures_total", credential="p256", key_type="p256", outcome="ok") == 3
    assert count(s, "dfns_agent_signatures_total", credential="p256", outcome="error") == 1
    assert count(s, "dfns_agent_signatures_total", credential="ed25519", key_type="ed25519", outcome="ok") == 1
    assert count(s, "dfns_agent_signatures_total", credential="ed25519", outcome="refused") == 1
    # a name that is not configured is counted under the fixed empty label: caller text never makes a series
    assert count(s, "dfns_agent_signatures_total", credential="", key_type="", outcome="refused") == 1
    assert not [labels for (_, labels) in s if ("credential", "nope") in labels]
    assert count(s, "dfns_agent_signatures_total") == 7
    assert count(s, "dfns_agent_sign_duration_seconds_count", key_type="p256") == 3
    assert count(s, "dfns_agent_sign_duration_seconds_count", key_type="ed25519") == 1
    assert len(records(world.audit_path)) == 7


def test_an_auto_pick_none_of_whose_credentials_is_allowed_is_counted_and_audited_under_one_label(
    world: World,
) -> None:
    """credential_not_allowed without a named credential reached credential selection: it is a refusal
    worth a record and a count, under the fixed label (however many different names callers send)."""
    foreign = make_challenge(b64url(b"someone-else"))

    async def refused() -> None:
        for _ in range(5):
            with pytest.raises(CredentialNotAllowed):
                await world.service.sign(foreign, None, caller=CALLER)
        for name in ("nope-1", "nope-2", "nope-3"):
            with pytest.raises(UnknownCredential):
                await world.service.sign(foreign, name, caller=CALLER)
        await world.service.sign(make_challenge(cred_id(KeyKind.P256)), None, caller=CALLER)

    asyncio.run(refused())
    s = world.samples()
    assert total(s, "dfns_agent_signatures_total", outcome="refused") == 8
    assert total(s, "dfns_agent_signatures_total", credential="", key_type="", outcome="refused") == 8
    assert total(s, "dfns_agent_signatures_total", credential="p256", key_type="p256", outcome="ok") == 1
    series = {dict(labels)["credential"] for (name, labels) in s if name == "dfns_agent_signatures_total"}
    assert series == {"", "p256"}
    recs = records(world.audit_path)
    assert [(r["outcome"], r.get("code"), r.get("credential")) for r in recs] == [
        *[("refused", "credential_not_allowed", None)] * 5,
        ("refused", "unknown_credential", "nope-1"),
        ("refused", "unknown_credential", "nope-2"),
        ("refused", "unknown_credential", "nope-3"),
        ("ok", None, "p256"),
    ]
    assert all(r["caller"]["uid"] == 1234 and r["challenge"] == foreign["challenge"] for r in recs[:8])
    assert verify(world.audit_path).ok


def test_a_registration_for_an_unknown_credential_is_counted_and_audited(world: World) -> None:
    challenge = {"challenge": b64url(b"reg-challenge"), "challengeIdentifier": "ci", "kind": "Key"}

    async def refused() -> None:
        with pytest.raises(UnknownCredential):
            await world.service.register(challenge, "nope", caller=CALLER)

    asyncio.run(refused())
    assert world.signatures(credential="", outcome="refused") == 1
    assert [(r["event"], r["code"], r["credential"]) for r in records(world.audit_path)] == [
        ("register", "unknown_credential", "nope")
    ]


# -- credentials on keys ----------------------------------------------------------------------------


def test_two_credentials_on_one_key_without_cred_ids_and_other_origins_are_refused_naming_both() -> None:
    """The default credId comes from the key: both would claim it, with different clientData forms."""
    store = new_store()
    twins = [
        CredentialConfig(name="plain", key=label(KeyKind.P256)),
        CredentialConfig(name="web", key=label(KeyKind.P256), origin=ORIGIN),
    ]
    for order in (twins, twins[::-1]):
        with pytest.raises(ConfigError) as e:
            SigningService.from_config(store, order)
        message = e.value.message
        assert "'plain'" in message and "'web'" in message and "key-p256" in message
        assert "different clientData" in message and "explicit, distinct cred_id" in message


def test_two_credentials_with_the_same_cred_id_on_different_keys_are_refused() -> None:
    store = new_store()
    same = [
        CredentialConfig(name="a", key=label(KeyKind.P256), cred_id="c2FtZQ"),
        CredentialConfig(name="b", key=label(KeyKind.ED25519), cred_id="c2FtZQ"),
    ]
    with pytest.raises(ConfigError, match="'a' and 'b' set the same cred_id .* different keys"):
        SigningService.from_config(store, same)


def test_a_cred_id_equal_to_another_keys_derived_one_is_refused() -> None:
    store = new_store()
    derived = SigningService.from_config(store, [CredentialConfig(name="a", key=label(KeyKind.P256))])
    copied = derived.credentials.get("a").cred_id
    configs_ = [
        CredentialConfig(name="a", key=label(KeyKind.P256)),
        CredentialConfig(name="b", key=label(KeyKind.ED25519), cred_id=copied),
    ]
    with pytest.raises(ConfigError, match="'a' and 'b' have the same credId"):
        SigningService.from_config(store, configs_)


def test_two_names_for_one_credential_that_sign_alike_are_allowed() -> None:
    """Same key, same origin, so the same credId and the same signature whichever is picked: one Dfns
    credential under two names (other Dfns settings, or the key registered in two Dfns organisations)."""
    store = new_store()
    aliases = [
        CredentialConfig(name="prod", key=label(KeyKind.P256), origin=ORIGIN),
        CredentialConfig(name="staging", key=label(KeyKind.P256), origin=ORIGIN),
    ]
    service = SigningService.from_config(store, aliases)
    assert service.credentials.get("prod").cred_id == service.credentials.get("staging").cred_id


def test_two_credentials_on_one_key_with_distinct_cred_ids_are_fine_and_each_signs_as_itself() -> None:
    store = new_store()
    twins = [
        CredentialConfig(name="plain", key=label(KeyKind.P256), cred_id=b64url(b"plain")),
        CredentialConfig(name="web", key=label(KeyKind.P256), cred_id=b64url(b"web"), origin=ORIGIN),
    ]
    service = SigningService.from_config(store, twins)
    web = asyncio.run(service.sign(make_challenge(b64url(b"web"))))
    assert web.cred_id == b64url(b"web")
    assert json.loads(b64url_decode(web.to_json()["credentialAssertion"]["clientData"]))["origin"] == ORIGIN


# -- health -----------------------------------------------------------------------------------------


def test_health_is_ok_with_every_key_in_place(world: World) -> None:
    health = asyncio.run(world.service.health())
    assert health.status is TokenState.OK and health.ok and health.reason is None
    assert dict(health.keys) == {k.value: True for k in KINDS}
    assert health.identity == world.store.identity
    assert health.token.present and health.token.logged_in
    answer = health.to_json()
    assert answer["status"] == "ok" and "reason" not in answer and answer["token"]["loggedIn"] is True


def test_health_is_degraded_naming_the_credential_whose_key_is_gone_or_changed(world: World) -> None:
    world.store.remove(label(KeyKind.P256))
    health = asyncio.run(world.service.health())
    assert health.status is TokenState.DEGRADED and not health.ok
    assert health.keys["p256"] is False and health.keys["ed25519"] is True
    assert health.reason == "key for credential 'p256' not found or changed"
    # What `status` and `doctor` read back is the same reason (the "reasons" bug of issue 17).
    assert AgentHealth.from_json(health.to_json()).reason == health.reason

    world.store.add(label(KeyKind.P256), KeyKind.P256)  # a different key under the old label
    world.store.replace(label(KeyKind.RSA2048))
    health = asyncio.run(world.service.health())
    assert health.status is TokenState.DEGRADED
    assert health.reason is not None
    assert "'p256'" in health.reason and "'rsa2048'" in health.reason and "'ed25519'" not in health.reason
    assert [n for n, good in health.keys.items() if not good] == ["p256", "rsa2048"]


def test_health_passes_on_the_token_state_and_reason(world: World) -> None:
    world.store.set_state(TokenState.DOWN, "the token reports its user PIN is locked")
    health = asyncio.run(world.service.health())
    assert health.status is TokenState.DOWN
    assert health.reason is not None and health.reason.startswith("the token reports its user PIN is locked")
    assert not any(health.keys.values()) and not health.token.present


def test_health_is_down_while_the_audit_log_cannot_write_and_ok_once_it_can(world: World) -> None:
    challenge = make_challenge(cred_id(KeyKind.P256))
    asyncio.run(world.service.sign(challenge, "p256"))
    assert asyncio.run(world.service.health()).ok
    with files_cannot_grow_past(world.audit_path.stat().st_size):
        with pytest.raises(AuditUnavailable):
            asyncio.run(world.service.sign(challenge, "p256"))
        # Health asks the file (so every worker sharing it agrees), not the last write of this one.
        health = asyncio.run(world.service.health())
        assert health.status is TokenState.DOWN
        assert health.reason is not None and f"cannot write audit log {world.audit_path}" in health.reason
        assert all(health.keys.values())  # the keys are fine: it is the log that is down
    asyncio.run(world.service.sign(challenge, "p256"))  # the log works again: so does signing
    assert asyncio.run(world.service.health()).ok
    assert [r["outcome"] for r in records(world.audit_path)] == ["ok", "ok"]
    assert verify(world.audit_path).ok


def test_uptime_counts_from_the_agent_start_it_is_given_not_from_the_service() -> None:
    """A reload makes a new service with the agent's start (agent/daemon/worker.py): uptime survives it."""
    store = new_store()
    first = SigningService.from_config(store, configs(), started=time.time() - 1200)
    reloaded = SigningService.from_config(store, configs(), started=first.started)
    assert asyncio.run(reloaded.health()).uptime_seconds >= 1200
    assert asyncio.run(SigningService.from_config(store, configs()).health()).uptime_seconds < 60
