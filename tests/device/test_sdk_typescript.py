"""The TypeScript example (examples/typescript: a @dfns/sdk CredentialSigner backed by the agent), for real.

The example is copied to a temporary directory, installed with ``npm ci`` from its lock file, compiled with
``tsc``, and run with Node against the local Dfns-compatible API and a real agent process signing on a
SoftHSM token. Skipped only when Node or npm is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.dev.testing import KINDS, ROOT, SdkWorld, sdk_world

EXAMPLE = ROOT / "examples" / "typescript"
NODE, NPM = shutil.which("node"), shutil.which("npm")
pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None, reason="the TypeScript example needs Node.js and npm on PATH (node/npm not found)"
)


@dataclass
class Env(SdkWorld):
    script: Path

    def run(self, kind: str, **extra: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "DFNS_API_URL": self.base_url,
            "DFNS_AUTH_TOKEN": self.accounts[kind].token,
            "DFNS_AGENT_SOCKET": str(self.agent.socket_path),
            **extra,
        }
        assert NODE is not None
        return subprocess.run([NODE, str(self.script)], env=env, capture_output=True, text=True, timeout=60)

    def wallets(self, kind: str) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.accounts[kind].token}"}
        r = httpx.get(f"{self.base_url}/wallets", headers=headers)
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items


@pytest.fixture(scope="module")
def built_example() -> Iterator[Path]:
    """A copy of the example, installed from its lock file and compiled: the path of the wallet script."""
    assert NPM is not None
    work = Path(tempfile.mkdtemp(prefix="da-ts-"))
    try:
        app = work / "example"
        shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("node_modules", "dist"))
        for cmd in ([NPM, "ci", "--no-audit", "--no-fund"], [NPM, "run", "build"]):
            r = subprocess.run(cmd, cwd=app, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{r.stdout}\n{r.stderr}"
        script = app / "dist" / "createWallet.js"
        assert script.is_file() and (app / "dist" / "agentSigner.js").is_file()
        yield script
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def env(
    built_example: Path, template_token: Path, template_keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    with sdk_world(template_token, template_keys, tmp_path_factory.mktemp("sdk-ts")) as w:
        yield Env(w.dfns, w.base_url, w.agent, w.accounts, built_example)


@pytest.mark.parametrize("kind", KINDS)
def test_the_example_creates_a_wallet_signed_by_the_agent(env: Env, kind: str) -> None:
    before = len(env.dfns.requests)
    r = env.run(kind, DFNS_AGENT_CREDENTIAL=kind, WALLET_NAME=f"ts-{kind}", WALLET_NETWORK="EthereumSepolia")
    assert r.returncode == 0, r.stderr
    wallet = json.loads(r.stdout)
    assert wallet["id"].startswith("wa-") and wallet["name"] == f"ts-{kind}"
    assert wallet["network"] == "EthereumSepolia"
    # The SDK ran init -> sign (agent) -> /auth/action -> the real call; the dev server verified each step.
    assert env.calls(before) == [
        ("POST", "/auth/action/init", False),
        ("POST", "/auth/action", False),
        ("POST", "/wallets", True),
    ]
    assert wallet["id"] in {w["id"] for w in env.wallets(kind)}


def test_without_a_credential_name_the_agent_picks_the_allowed_one(env: Env) -> None:
    r = env.run("rsa3072", WALLET_NETWORK="Bitcoin", WALLET_NAME="ts-default")
    assert r.returncode == 0, r.stderr
    wallet = json.loads(r.stdout)
    assert wallet["network"] == "Bitcoin"
    assert wallet["id"] in {w["id"] for w in env.wallets("rsa3072")}


def test_an_agent_refusal_is_reported_and_nothing_is_sent(env: Env) -> None:
    wallets_before = len(env.wallets("p256"))
    before = len(env.dfns.requests)
    r = env.run("p256", DFNS_AGENT_CREDENTIAL="ed25519", WALLET_NAME="ts-refused")
    assert r.returncode == 1
    assert "dfns-agent refused to sign: credential_not_allowed" in r.stderr, r.stderr
    assert env.calls(before) == [("POST", "/auth/action/init", False)]
    assert len(env.wallets("p256")) == wallets_before


def test_an_absent_agent_is_reported(env: Env, short_dir: Path) -> None:
    r = env.run("p256", DFNS_AGENT_SOCKET=str(short_dir / "none.sock"))
    assert r.returncode == 1
    assert "agent_unreachable" in r.stderr and "none.sock" in r.stderr, r.stderr
