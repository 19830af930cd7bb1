"""Shared fixtures: real SoftHSM tokens, real agent processes on real Unix sockets.

A template token with one key of every supported type is built once per test session; each test that
needs a token gets a copy (copying a token directory takes about a millisecond, re-initializing one takes
several), so tests never share token state.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.dev.dfns_server import DevDfns, DevDfnsServer, ServiceAccount
from agent.token.device import find_softhsm_module

ROOT = Path(__file__).resolve().parent.parent
PIN = "461-test:pin"  # has a colon on purpose: CloudHSM-style PINs must pass through unchanged
SO_PIN = "so-pin-12345678"
TOKEN_LABEL = "agent-test"
KINDS = ["ed25519", "p256", "secp256k1", "rsa2048", "rsa3072"]
SPARE_KEY = "key-spare-p256"  # on the token but in no credential: for registration (rotation) tests


def softhsm_module() -> str:
    module = find_softhsm_module()
    if module is None:
        raise RuntimeError("SoftHSM is not installed: run ./softhsm_setup.sh test")
    return module


MODULE = softhsm_module()


def write_softhsm_conf(directory: Path) -> Path:
    template = (ROOT / "pkcs11_config" / "softhsm2.conf.in").read_text()
    conf = directory / "softhsm2.conf"
    conf.write_text(template.replace("@TOKENDIR@", str(directory / "tokens")))
    return conf


def key_label(kind: str) -> str:
    return f"key-{kind}"


def cred_id_for(kind: str) -> str:
    return base64.urlsafe_b64encode(f"ci-test-{kind}".encode()).rstrip(b"=").decode()


@dataclass
class TokenEnv:
    """A private copy of the template token plus an agent config that uses it."""

    dir: Path
    softhsm_conf: Path
    pin_file: Path
    config: Path
    credentials: dict[str, str] = field(default_factory=dict)  # name -> credId

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e["SOFTHSM2_CONF"] = str(self.softhsm_conf)
        e["XDG_STATE_HOME"] = str(self.dir / "state")  # any default-path state stays in the test's dir
        e.pop("DFNS_AGENT_CONFIG", None)
        return e

    @property
    def audit_file(self) -> Path:
        return self.dir / "audit.jsonl"

    def write_config(
        self, extra_credentials: str = "", server: str = "", pin: str | None = None, extra_top: str = ""
    ) -> None:
        pin_section = pin if pin is not None else f'file = "{self.pin_file}"'
        creds = "".join(
            f'\n[[credential]]\nname = "{kind}"\nkey = "{key_label(kind)}"\ncred_id = "{cred_id_for(kind)}"\n'
            for kind in KINDS
        )
        self.config.write_text(
            f'[token]\nmodule = "{MODULE}"\nlabel = "{TOKEN_LABEL}"\n'
            f'[token.module_env]\nSOFTHSM2_CONF = "{self.softhsm_conf}"\n'
            f"[token.pin]\n{pin_section}\n"
            f"[server]\n{server}\n"
            f'[audit]\nfile = "{self.audit_file}"\n'
            f"{extra_top}"
            f"{creds}{extra_credentials}"
        )
        self.credentials = {kind: cred_id_for(kind) for kind in KINDS}


@pytest.fixture(scope="session")
def template_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("template")
    (d / "tokens").mkdir()
    conf = write_softhsm_conf(d)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        env=env,
        capture_output=True,
    )
    # Keys are made by the agent's own generator, in a child process so this one loads SoftHSM later
    # against its own copy.
    script = (
        "from agent.config import TokenConfig\n"
        "from agent.secret import Secret\n"
        "from agent.token.device import Token, KeyKind\n"
        f"cfg = TokenConfig(module={MODULE!r}, label={TOKEN_LABEL!r})\n"
        "import json\n"
        f"with Token.open(cfg, Secret({PIN!r}, 'test'), rw=True) as t:\n"
        f"    for kind in {KINDS!r}:\n"
        "        t.generate(KeyKind(kind), 'key-' + kind)\n"
        f"    t.generate(KeyKind.P256, {SPARE_KEY!r})\n"
        "    print(json.dumps({k.label: k.public_pem for k in t.keys()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    (d / "public_keys.json").write_text(out.stdout)
    return d


@pytest.fixture(scope="session")
def template_keys(template_token: Path) -> dict[str, str]:
    """Public key PEM of every key on the template token (and so on every copy), by label."""
    keys: dict[str, str] = json.loads((template_token / "public_keys.json").read_text())
    return keys


def make_token_env(template: Path, directory: Path) -> TokenEnv:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(template / "tokens", directory / "tokens")
    conf = write_softhsm_conf(directory)
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    te = TokenEnv(dir=directory, softhsm_conf=conf, pin_file=pin_file, config=directory / "agent.toml")
    te.write_config()
    return te


@pytest.fixture
def token_env(template_token: Path, tmp_path: Path) -> TokenEnv:
    return make_token_env(template_token, tmp_path / "hsm")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is limited to 107 bytes; pytest's tmp paths are long)."""
    d = Path(tempfile.mkdtemp(prefix="da-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------
# Running the agent


class AgentProcess:
    """``dfns-agent serve`` in a child process, as a user would run it."""

    def __init__(self, token_env: TokenEnv, socket_path: Path, *, verbose: bool = False) -> None:
        self.token_env = token_env
        self.socket_path = socket_path
        self.log_path = token_env.dir / f"agent-{secrets.token_hex(3)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(token_env.config)]
            + (["--verbose"] if verbose else [])
            + ["serve", "--socket", str(socket_path)],
            env=token_env.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://agent")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.http.get("/v1/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.http.post(path, json=body)

    def stop(self) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_agent(short_dir: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def start(te: TokenEnv, *, wait: bool = True, socket_path: Path | None = None) -> AgentProcess:
        a = AgentProcess(te, socket_path or short_dir / "run" / "agent.sock")
        started.append(a)
        if wait:
            a.wait_ready()
        return a

    yield start
    for a in started:
        rc = a.stop()
        out = a.output()
        assert PIN not in out, "the PIN appeared in the agent's output"
        assert rc in (0, 1, 2), f"agent ended with {rc}:\n{out}"


def connect_raw(path: Path) -> socket.socket:
    """A plain client socket to an agent, for speaking HTTP byte by byte (5 s timeout on every call)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(path))
    return s


@contextlib.contextmanager
def running_agent(te: TokenEnv, *, verbose: bool = False) -> Iterator[AgentProcess]:
    """An agent for a whole module (on a short socket path); it must then stop cleanly and never print the PIN."""
    d = Path(tempfile.mkdtemp(prefix="da-"))
    a = AgentProcess(te, d / "run" / "agent.sock", verbose=verbose)
    try:
        a.wait_ready()
        yield a
    finally:
        rc = a.stop()
        shutil.rmtree(d, ignore_errors=True)
        out = a.output()
        assert rc == 0, out
        assert PIN not in out, "the PIN appeared in the agent's output"


@pytest.fixture
def agent(token_env: TokenEnv, start_agent: Any) -> AgentProcess:
    a: AgentProcess = start_agent(token_env)
    return a


# ------------------------------------------------------------------------------------------------------
# Dfns challenges and verification


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_challenge(*allowed: str) -> dict[str, Any]:
    """An /auth/action/init answer shaped like Dfns's."""
    from agent.dev.dfns_server import action_challenge

    challenge = b64url(f"ch-{secrets.token_hex(4)}-{secrets.token_hex(4)}".encode())
    return action_challenge(challenge, "eyJ0eXAiOiJKV1QifQ." + b64url(secrets.token_bytes(24)), list(allowed))


def verify_signature(public_pem: str, signature: bytes, message: bytes) -> None:
    """Raises InvalidSignature unless ``signature`` is the Dfns encoding of a signature over ``message``."""
    key = serialization.load_pem_public_key(public_pem.encode())
    if isinstance(key, ed25519.Ed25519PublicKey):
        assert len(signature) == 64
        key.verify(signature, message)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        assert signature[0] == 0x30, "ECDSA signatures must be DER"
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPublicKey):
        assert len(signature) == key.key_size // 8
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    else:  # pragma: no cover
        raise AssertionError(f"unexpected key type {type(key)}")


def check_assertion(first_factor: dict[str, Any], challenge: dict[str, Any], public_pem: str, cred_id: str) -> bytes:
    """Check a firstFactor the way Dfns does; returns the clientData bytes."""
    assert first_factor["kind"] == "Key"
    assertion = first_factor["credentialAssertion"]
    assert set(assertion) == {"credId", "clientData", "signature"}
    assert assertion["credId"] == cred_id
    assert "=" not in assertion["clientData"] and "=" not in assertion["signature"]
    data = b64url_decode(assertion["clientData"])
    parsed = json.loads(data)
    assert parsed["type"] == "key.get"
    assert parsed["challenge"] == challenge["challenge"]
    verify_signature(public_pem, b64url_decode(assertion["signature"]), data)
    return data


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


@dataclass
class SdkWorld:
    """A local Dfns-compatible API with one service account per key type, and an agent signing with those
    keys (no ``[credential.dfns]``: in the SDK tests the SDK talks to Dfns, the agent only signs)."""

    dfns: DevDfns
    base_url: str
    agent: AgentProcess
    accounts: dict[str, ServiceAccount]  # by key type

    def calls(self, since: int = 0) -> list[tuple[str, str, bool]]:
        return [(c["method"], c["path"], c["user_action"]) for c in self.dfns.requests[since:]]


@contextlib.contextmanager
def sdk_world(template_token: Path, template_keys: dict[str, str], directory: Path) -> Iterator[SdkWorld]:
    dfns = DevDfns()
    server = DevDfnsServer(dfns)
    base_url = server.start()
    accounts = {
        kind: dfns.create_service_account(f"sa-{kind}", template_keys[key_label(kind)], cred_id=cred_id_for(kind))
        for kind in KINDS
    }
    try:
        with running_agent(make_token_env(template_token, directory / "hsm")) as agent:
            yield SdkWorld(dfns, base_url, agent, accounts)
    finally:
        server.stop()
