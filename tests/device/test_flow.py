"""The whole Dfns user-action flow through the agent, against the local Dfns-compatible server.

Real parts throughout: the agent process signs on a SoftHSM token, talks HTTP to a DevDfns server on
127.0.0.1, which verifies signatures the way Dfns does. Faults (429, 5xx, delays) are injected there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.dev.dfns_server import DevDfns, DevDfnsServer, ServiceAccount
from agent.dev.testing import (
    KINDS,
    PIN,
    ROOT,
    SPARE_KEY,
    AgentProcess,
    cred_id_for,
    key_label,
    make_challenge,
    make_token_env,
    run_cli,
    running_agent,
)


@dataclass
class Setup:
    agent: AgentProcess
    dfns: DevDfns
    base_url: str
    accounts: dict[str, ServiceAccount]
    responses: list[str]

    def call(self, path: str, body: dict[str, Any]) -> httpx.Response:
        r = self.agent.post(path, body)
        self.responses.append(r.text)
        return r

    def calls(self, path: str) -> list[dict[str, Any]]:
        return [c for c in self.dfns.requests if c["path"] == path]


def _dfns_section(base_url: str, token_file: Path, **extra: Any) -> str:
    lines = [f'base_url = "{base_url}"', f'token_file = "{token_file}"'] + [f"{k} = {v}" for k, v in extra.items()]
    return "[credential.dfns]\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def setup(
    template_token: Path, template_keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    dfns = DevDfns()
    server = DevDfnsServer(dfns)
    base_url = server.start()
    te = make_token_env(template_token, tmp_path_factory.mktemp("flow") / "hsm")
    accounts: dict[str, ServiceAccount] = {}
    creds = ""
    for kind in KINDS:
        sa = dfns.create_service_account(f"sa-{kind}", template_keys[key_label(kind)], cred_id=cred_id_for(kind))
        accounts[kind] = sa
        token_file = te.dir / f"{kind}.token"
        token_file.write_text(sa.token)
        token_file.chmod(0o600)
        creds += (
            f'\n[[credential]]\nname = "{kind}"\nkey = "{key_label(kind)}"\ncred_id = "{cred_id_for(kind)}"\n'
            + _dfns_section(base_url, token_file, retries=2)
        )
    ed_token = te.dir / "ed25519.token"
    # Same identity and key as "ed25519", but impatient: for timeouts.
    creds += (
        f'\n[[credential]]\nname = "impatient"\nkey = "{key_label("ed25519")}"\ncred_id = "{cred_id_for("ed25519")}"\n'
        + _dfns_section(base_url, ed_token, timeout=0.5, retries=0)
    )
    # A key on the token not yet known to Dfns, to be registered through the ed25519 identity (rotation).
    creds += f'\n[[credential]]\nname = "spare"\nkey = "{SPARE_KEY}"\n' + _dfns_section(base_url, ed_token)
    bad_token = te.dir / "bad.token"
    bad_token.write_text("not-a-valid-token")
    bad_token.chmod(0o600)
    creds += (
        f'\n[[credential]]\nname = "bad-token"\nkey = "{key_label("p256")}"\ncred_id = "{cred_id_for("p256")}"\n'
        + _dfns_section(base_url, bad_token)
    )
    creds += (
        f'\n[[credential]]\nname = "no-dfns"\nkey = "{key_label("p256")}"\ncred_id = "{cred_id_for("p256")}"\n'
        f'\n[[credential]]\nname = "unreachable"\nkey = "{key_label("p256")}"\n'
        + _dfns_section("http://127.0.0.1:9", bad_token, retries=1, connect_timeout=0.5)
    )
    te.config.write_text(te.config.read_text().split("[[credential]]")[0] + creds)
    try:
        with running_agent(te, verbose=True) as agent:
            s = Setup(agent, dfns, base_url, accounts, [])
            yield s
    finally:
        server.stop()
    out = agent.output()
    for secret in [PIN, "not-a-valid-token"] + [sa.token for sa in accounts.values()]:
        assert secret not in out, "a secret appeared in the agent's log"
        assert all(secret not in text for text in s.responses), "a secret appeared in a response"


def upstream(r: httpx.Response) -> bool:
    return r.headers.get("x-dfns-agent-upstream") == "dfns"


@pytest.mark.parametrize("kind", KINDS)
def test_request_runs_the_whole_flow_for_every_key_type(setup: Setup, kind: str) -> None:
    before = len(setup.calls("/auth/action"))
    r = setup.call(
        "/v1/request",
        {"method": "POST", "path": "/wallets", "body": {"network": "Ethereum", "name": kind}, "credential": kind},
    )
    assert r.status_code == 200, r.text
    assert upstream(r)
    wallet = r.json()
    assert wallet["id"].startswith("wa-") and wallet["name"] == kind
    assert len(setup.calls("/auth/action")) == before + 1
    # The wallet belongs to that credential's identity: its own GET sees it.
    listed = setup.call("/v1/request", {"method": "GET", "path": "/wallets", "credential": kind})
    assert wallet["id"] in {w["id"] for w in listed.json()["items"]}


def test_user_action_returns_a_single_use_token_bound_to_the_payload(setup: Setup) -> None:
    body = {"network": "Bitcoin", "name": "ua-test"}
    r = setup.call("/v1/user-action", {"method": "POST", "path": "/wallets", "body": body, "credential": "p256"})
    assert r.status_code == 200, r.text
    ua = r.json()
    assert ua["payload"] == '{"network":"Bitcoin","name":"ua-test"}'
    headers = {
        "Authorization": f"Bearer {setup.accounts['p256'].token}",
        "X-DFNS-USERACTION": ua["userAction"],
        "Content-Type": "application/json",
    }
    with httpx.Client(base_url=setup.base_url) as dfns:
        first = dfns.post("/wallets", content=ua["payload"], headers=headers)
        assert first.status_code == 200, first.text
        again = dfns.post("/wallets", content=ua["payload"], headers=headers)
        assert again.status_code == 400 and "already been used" in again.json()["error"]["message"]


def test_a_tampered_payload_is_refused(setup: Setup) -> None:
    ua = setup.call(
        "/v1/user-action",
        {
            "method": "POST",
            "path": "/wallets/wa-1/transfers",
            "body": {"kind": "Native", "to": "0xabc", "amount": "1"},
            "credential": "ed25519",
        },
    ).json()
    tampered = '{"kind":"Native","to":"0xEVIL","amount":"1"}'
    headers = {
        "Authorization": f"Bearer {setup.accounts['ed25519'].token}",
        "X-DFNS-USERACTION": ua["userAction"],
        "Content-Type": "application/json",
    }
    with httpx.Client(base_url=setup.base_url) as dfns:
        r = dfns.post("/wallets/wa-1/transfers", content=tampered, headers=headers)
    assert r.status_code == 403
    assert "user action" in r.json()["error"]["message"]


def test_a_signed_challenge_cannot_be_used_twice(setup: Setup) -> None:
    token = setup.accounts["secp256k1"].token
    with httpx.Client(base_url=setup.base_url, headers={"Authorization": f"Bearer {token}"}) as dfns:
        challenge = dfns.post(
            "/auth/action/init",
            json={
                "userActionHttpMethod": "POST",
                "userActionHttpPath": "/wallets",
                "userActionPayload": "{}",
                "userActionServerKind": "Api",
            },
        ).json()
        signed = setup.call("/v1/sign", {"challenge": challenge, "credential": "secp256k1"})
        assert signed.status_code == 200
        body = {"challengeIdentifier": challenge["challengeIdentifier"], "firstFactor": signed.json()}
        assert dfns.post("/auth/action", json=body).status_code == 200
        replay = dfns.post("/auth/action", json=body)
    assert replay.status_code == 400
    assert replay.json()["error"]["message"] == "Challenge token is not valid."


def test_get_goes_straight_through_without_a_user_action(setup: Setup) -> None:
    inits = len(setup.calls("/auth/action/init"))
    r = setup.call("/v1/request", {"method": "GET", "path": "/wallets?limit=10", "credential": "rsa2048"})
    assert r.status_code == 200 and upstream(r)
    assert "items" in r.json()
    assert len(setup.calls("/auth/action/init")) == inits
    assert setup.dfns.requests[-1]["user_action"] is False


def test_policy_pending_202_is_returned_as_is(setup: Setup) -> None:
    wallet = setup.call(
        "/v1/request", {"method": "POST", "path": "/wallets", "body": {"network": "Ethereum"}, "credential": "p256"}
    ).json()
    r = setup.call(
        "/v1/request",
        {
            "method": "POST",
            "path": f"/wallets/{wallet['id']}/transfers",
            "body": {"kind": "Native", "to": "0x" + "11" * 20, "amount": "5000000"},
            "credential": "p256",
        },
    )
    assert r.status_code == 202 and upstream(r)
    assert r.json()["status"] == "PendingApproval"


def test_bodyless_mutation_uses_an_empty_object(setup: Setup, template_keys: dict[str, str]) -> None:
    created = setup.call(
        "/v1/request",
        {
            "method": "POST",
            "path": "/auth/service-accounts",
            "body": {"name": "temp-sa", "publicKey": template_keys[SPARE_KEY]},
            "credential": "ed25519",
        },
    )
    assert created.status_code == 200, created.text
    user_id = created.json()["userInfo"]["userId"]
    ua = setup.call(
        "/v1/user-action",
        {"method": "PUT", "path": f"/auth/service-accounts/{user_id}/deactivate", "credential": "ed25519"},
    )
    assert ua.json()["payload"] == "{}"
    r = setup.call(
        "/v1/request",
        {"method": "PUT", "path": f"/auth/service-accounts/{user_id}/deactivate", "credential": "ed25519"},
    )
    assert r.status_code == 200, r.text


def test_rate_limited_init_is_retried_then_succeeds(setup: Setup) -> None:
    setup.dfns.inject_fault("/auth/action/init", status=429, times=1)
    inits = len(setup.calls("/auth/action/init"))
    r = setup.call(
        "/v1/user-action",
        {"method": "POST", "path": "/wallets", "body": {"network": "Ethereum"}, "credential": "ed25519"},
    )
    assert r.status_code == 200, r.text
    assert len(setup.calls("/auth/action/init")) == inits + 2


def test_persistent_5xx_on_init_surfaces_after_bounded_retries(setup: Setup) -> None:
    setup.dfns.inject_fault("/auth/action/init", status=503, times=3)
    inits = len(setup.calls("/auth/action/init"))
    r = setup.call("/v1/user-action", {"method": "POST", "path": "/wallets", "body": {}, "credential": "ed25519"})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "dfns_error" and "/auth/action/init" in err["message"] and err["dfns"]["status"] == 503
    assert len(setup.calls("/auth/action/init")) == inits + 3  # 1 + retries (2)


def test_auth_action_failure_is_never_retried(setup: Setup) -> None:
    setup.dfns.inject_fault("/auth/action", status=500, times=1)
    actions = len(setup.calls("/auth/action"))
    r = setup.call("/v1/user-action", {"method": "POST", "path": "/wallets", "body": {}, "credential": "ed25519"})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "dfns_error"
    assert len(setup.calls("/auth/action")) == actions + 1


@pytest.mark.parametrize("status", [401, 403])
def test_dfns_refusals_carry_dfns_status_and_message(setup: Setup, status: int) -> None:
    setup.dfns.inject_fault("/auth/action/init", status=status, times=1)
    r = setup.call("/v1/user-action", {"method": "POST", "path": "/wallets", "body": {}, "credential": "rsa3072"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == "dfns_error" and err["dfns"]["status"] == status and err["message"]


def test_a_refused_real_call_is_passed_through(setup: Setup) -> None:
    r = setup.call("/v1/request", {"method": "GET", "path": "/wallets/wa-does-not-exist", "credential": "p256"})
    assert r.status_code == 404 and upstream(r)
    assert "error" in r.json()


def test_bad_bearer_token_is_a_clear_401(setup: Setup) -> None:
    r = setup.call("/v1/user-action", {"method": "POST", "path": "/wallets", "body": {}, "credential": "bad-token"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "dfns_error"


def test_timeout_is_504(setup: Setup) -> None:
    setup.dfns.inject_fault("/auth/action/init", delay=2.0, times=1)
    r = setup.call("/v1/user-action", {"method": "POST", "path": "/wallets", "body": {}, "credential": "impatient"})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "dfns_timeout"


def test_unreachable_dfns_is_502(setup: Setup) -> None:
    r = setup.call("/v1/user-action", {"method": "POST", "path": "/wallets", "body": {}, "credential": "unreachable"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "dfns_unreachable"


def test_credential_without_dfns_settings(setup: Setup) -> None:
    r = setup.call("/v1/request", {"method": "GET", "path": "/wallets", "credential": "no-dfns"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "dfns_not_configured"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"method": "GET", "path": "/wallets"}, "invalid_request"),  # GET needs no user action
        ({"method": "POST", "path": "wallets"}, "invalid_path"),
        ({"method": "POST", "path": "https://evil.example/wallets"}, "invalid_path"),
        ({"method": "POST", "path": "/wallets#frag"}, "invalid_path"),
        ({"method": "POST", "path": "/a b"}, "invalid_path"),
        ({"method": "PO ST", "path": "/wallets"}, "invalid_request"),
        ({"method": "POST"}, "invalid_request"),
        ({"method": "POST", "path": "/wallets", "extra": 1}, "invalid_request"),
    ],
)
def test_bad_user_action_requests(setup: Setup, body: dict[str, Any], code: str) -> None:
    r = setup.call("/v1/user-action", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == code


def test_register_a_new_key_then_sign_with_it(setup: Setup) -> None:
    """Rotation: register the spare key through the ed25519 identity, then use it for a user action."""
    r = setup.call("/v1/credentials", {"credential": "spare", "via": "ed25519", "credentialName": "rotated"})
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["kind"] == "Key" and created["isActive"] is True and created["name"] == "rotated"
    spare = {c["name"]: c for c in setup.agent.http.get("/v1/credentials").json()["credentials"]}["spare"]
    assert created["credentialId"] == spare["credId"]
    used = setup.call(
        "/v1/request", {"method": "POST", "path": "/wallets", "body": {"network": "Ethereum"}, "credential": "spare"}
    )
    assert used.status_code == 200, used.text
    # Registering it again is refused by Dfns (the credId exists), with Dfns's status.
    again = setup.call("/v1/credentials", {"credential": "spare", "via": "ed25519"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "dfns_error"


def test_sign_still_refuses_credentials_the_challenge_does_not_allow(setup: Setup) -> None:
    r = setup.call("/v1/sign", {"challenge": make_challenge("someone-else"), "credential": "p256"})
    assert r.status_code == 422


def test_request_cli(setup: Setup, tmp_path: Path) -> None:
    data = tmp_path / "body.json"
    data.write_text(json.dumps({"network": "Ethereum", "name": "from-cli"}))
    te = setup.agent.token_env
    sock = ["--socket", str(setup.agent.socket_path)]
    r = run_cli(te, "request", "POST", "/wallets", "--data", f"@{data}", "--credential", "p256", *sock, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "from-cli"
    missing = run_cli(te, "request", "GET", "/wallets/nope", "--credential", "p256", *sock, timeout=60)
    assert missing.returncode == 1 and "Dfns answered 404" in missing.stderr


def test_client_library_request_and_user_action(setup: Setup) -> None:
    from agent.client import AgentClient

    with AgentClient(setup.agent.socket_path) as client:
        answer = client.request("POST", "/wallets", {"network": "Solana"}, credential="secp256k1")
        assert answer.status == 200 and answer.json()["network"] == "Solana"
        ua = client.user_action("DELETE", "/wallets/wa-x/tags", credential="secp256k1")
        assert ua["payload"] == "{}" and ua["userAction"]


def test_dev_dfns_command_uses_the_agents_default_cred_id(template_keys: dict[str, str], tmp_path: Path) -> None:
    import signal

    from cryptography.hazmat.primitives import serialization

    from agent.dfns import cred_id_for_key

    pem = tmp_path / "k.pem"
    pem.write_text(template_keys[SPARE_KEY])
    (tmp_path / "tokens").mkdir(mode=0o700)
    (tmp_path / "tokens" / "spare.token").write_text("fixed-dev-token\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "dev-dfns",
            "--port",
            "0",
            "--service-account",
            f"spare={pem}",
            "--tokens-dir",
            str(tmp_path / "tokens"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        account_line = proc.stdout.readline()
        spki = serialization.load_pem_public_key(pem.read_bytes()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert f"credId={cred_id_for_key(spki)}" in account_line
        assert "fixed-dev-token" not in account_line
        # The existing token file was reused, so a config naming it keeps working.
        r = httpx.get(url + "/wallets", headers={"Authorization": "Bearer fixed-dev-token"})
        assert r.status_code == 200 and r.json() == {"items": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert proc.returncode == 0
