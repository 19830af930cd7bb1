"""The official Dfns Python SDK (``dfns_sdk``) signing through the agent, against the local Dfns API.

The SDK makes every HTTP call itself (``/auth/action/init`` → ``signer.sign`` → ``/auth/action`` → the real
call); :class:`agent.integrations.dfns_sdk.AgentSigner` only hands the challenge to a real agent process,
which signs on a SoftHSM token. The DevDfns server verifies the signatures and user actions as Dfns does.
``dfns-sdk`` is a test dependency (the ``test`` extra), so these tests always run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dfns_sdk import DfnsClient, DfnsClientConfig, DfnsDelegatedClient, DfnsDelegatedClientConfig, DfnsError

from agent.client import AgentClientError
from agent.dev.testing import KINDS, ROOT, SdkWorld, cred_id_for, sdk_world
from agent.integrations.dfns_sdk import AgentSigner


class Env(SdkWorld):
    def client(self, kind: str, signer: AgentSigner | None) -> DfnsClient:
        return DfnsClient(DfnsClientConfig(auth_token=self.accounts[kind].token, base_url=self.base_url, signer=signer))


@pytest.fixture(scope="module")
def env(template_token: Path, template_keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with sdk_world(template_token, template_keys, tmp_path_factory.mktemp("sdk-py")) as w:
        yield Env(w.dfns, w.base_url, w.agent, w.accounts)


@pytest.mark.parametrize("kind", KINDS)
def test_sdk_creates_a_wallet_with_the_agent_as_signer(env: Env, kind: str) -> None:
    before = len(env.dfns.requests)
    with AgentSigner(env.agent.socket_path, credential=kind) as signer:
        with env.client(kind, signer) as client:
            wallet: dict[str, Any] = dict(client.wallets.create_wallet({"network": "EthereumSepolia", "name": kind}))
            listed = client.wallets.list_wallets()
    assert wallet["id"].startswith("wa-")
    assert wallet["network"] == "EthereumSepolia" and wallet["name"] == kind
    # The SDK ran the whole dance itself against the dev server, which accepted the agent's signature.
    assert env.calls(before) == [
        ("POST", "/auth/action/init", False),
        ("POST", "/auth/action", False),
        ("POST", "/wallets", True),
        ("GET", "/wallets", False),
    ]
    assert wallet["id"] in {w["id"] for w in listed["items"]}


def test_without_a_credential_name_the_agent_picks_the_one_the_challenge_allows(env: Env) -> None:
    before = len(env.dfns.requests)
    with AgentSigner(env.agent.socket_path) as signer, env.client("secp256k1", signer) as client:
        # A non-ASCII name too: the SDK signs json.dumps(body) (ASCII escapes) but sends httpx's JSON (UTF-8).
        wallet = client.wallets.create_wallet({"network": "Bitcoin", "name": "trésor"})
    assert wallet["id"].startswith("wa-") and wallet["name"] == "trésor"
    assert ("POST", "/wallets", True) in env.calls(before)


def test_the_signer_returns_the_sdk_credential_assertion_shape(env: Env) -> None:
    """What the SDK hands ``sign`` (a dict) and what it sends back as ``firstFactor`` (a dict)."""
    delegated = DfnsDelegatedClient(
        DfnsDelegatedClientConfig(auth_token=env.accounts["p256"].token, base_url=env.base_url)
    )
    body = {"network": "Polygon", "name": "delegated"}
    challenge = delegated.wallets.create_wallet_init(body)
    assert isinstance(challenge, dict)
    with AgentSigner(env.agent.socket_path, credential="p256") as signer:
        first_factor = signer.sign(challenge)
    assert type(first_factor) is dict
    assert first_factor["kind"] == "Key"
    assert set(first_factor["credentialAssertion"]) == {"credId", "clientData", "signature"}
    assert first_factor["credentialAssertion"]["credId"] == cred_id_for("p256")
    wallet = delegated.wallets.create_wallet_complete(
        body, {"challengeIdentifier": challenge["challengeIdentifier"], "firstFactor": dict(first_factor)}
    )
    assert wallet["id"].startswith("wa-") and wallet["name"] == "delegated"


def test_an_agent_refusal_surfaces_as_a_clear_exception(env: Env) -> None:
    before = len(env.dfns.requests)
    # The p256 service account's challenge allows only the p256 key; the signer insists on ed25519.
    with AgentSigner(env.agent.socket_path, credential="ed25519") as signer, env.client("p256", signer) as client:
        with pytest.raises(AgentClientError) as info:
            client.wallets.create_wallet({"network": "EthereumSepolia", "name": "refused"})
    assert info.value.code == "credential_not_allowed" and info.value.status == 422
    assert "ed25519" in str(info.value) and cred_id_for("p256") in str(info.value)
    # Nothing was signed, so the SDK never got to /auth/action nor to the real call.
    assert env.calls(before) == [("POST", "/auth/action/init", False)]


def test_an_unknown_credential_and_an_absent_agent_are_reported(env: Env, tmp_path: Path) -> None:
    with AgentSigner(env.agent.socket_path, credential="nope") as signer, env.client("p256", signer) as client:
        with pytest.raises(AgentClientError) as info:
            client.wallets.create_wallet({"network": "EthereumSepolia"})
    assert info.value.code == "unknown_credential"
    with AgentSigner(tmp_path / "no-agent.sock", timeout=2) as signer, env.client("p256", signer) as client:
        with pytest.raises(AgentClientError) as info:
            client.wallets.create_wallet({"network": "EthereumSepolia"})
    assert info.value.code == "agent_unreachable" and "no-agent.sock" in info.value.message


def test_without_a_signer_the_sdk_refuses_before_calling_dfns(env: Env) -> None:
    """Sanity check that the wallets call really needs the signer (so the tests above exercise it)."""
    before = len(env.dfns.requests)
    with env.client("p256", None) as client, pytest.raises(DfnsError) as info:
        client.wallets.create_wallet({"network": "EthereumSepolia"})
    assert info.value.error_code == "SIGNER_REQUIRED"
    assert env.calls(before) == []


def test_the_integration_does_not_import_the_sdk() -> None:
    """The agent runs without dfns-sdk installed: importing the integration must not need it."""
    code = "import sys, agent.integrations.dfns_sdk; print('dfns_sdk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
