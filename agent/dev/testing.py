"""Test helpers shared by the test suite (``tests/``), the benchmark and anyone poking at an agent by hand.

Real SoftHSM tokens, real agent processes on real Unix sockets, Dfns-shaped challenges and the checks Dfns
makes on what the agent answers. The pytest fixtures built on these live in the ``conftest.py`` files; this
module has no pytest dependency and imports without SoftHSM (the module is only looked for when a token is
made or a config written).

One way to build a token: :func:`build_template_token` makes a token with one key of every supported type
(once per test session, see :func:`shared_template_token`), and :func:`make_token_env` gives each test a
private copy of it (copying a token directory takes about a millisecond, re-initializing one takes several).
One way to run the CLI: :func:`run_cli`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from prometheus_client.parser import text_string_to_metric_families

from agent.dev import softhsm
from agent.dev.dfns_server import DevDfns, DevDfnsServer, ServiceAccount, action_challenge

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout (agent.dev is not in the wheel)
PIN = "461-test:pin"  # has a colon on purpose: CloudHSM-style PINs must pass through unchanged
SO_PIN = "so-pin-12345678"
TOKEN_LABEL = "agent-test"
KINDS = ["ed25519", "p256", "secp256k1", "rsa2048", "rsa3072"]
SPARE_KEY = "key-spare-p256"  # on the token but in no credential: for registration (rotation) tests


@cache
def softhsm_module() -> str:
    """The SoftHSM module's path; raises if SoftHSM is not installed."""
    module = softhsm.find_softhsm_module()
    if module is None:
        raise RuntimeError("SoftHSM is not installed: run ./softhsm_setup.sh test")
    return module


def key_label(kind: str) -> str:
    return f"key-{kind}"


def cred_id_for(kind: str) -> str:
    return base64.urlsafe_b64encode(f"ci-test-{kind}".encode()).rstrip(b"=").decode()


# ------------------------------------------------------------------------------------------------------
# Tokens


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
            f'[token]\nmodule = "{softhsm_module()}"\nlabel = "{TOKEN_LABEL}"\n'
            f'[token.module_env]\nSOFTHSM2_CONF = "{self.softhsm_conf}"\n'
            f"[token.pin]\n{pin_section}\n"
            f"[server]\n{server}\n"
            f'[audit]\nfile = "{self.audit_file}"\n'
            f"{extra_top}"
            f"{creds}{extra_credentials}"
        )
        self.credentials = {kind: cred_id_for(kind) for kind in KINDS}


def build_template_token(directory: Path) -> Path:
    """A token in ``directory`` with one key of every kind (labels :func:`key_label`) and :data:`SPARE_KEY`;
    the public keys by label are saved in ``public_keys.json`` beside it."""
    keys = {key_label(kind): kind for kind in KINDS} | {SPARE_KEY: "p256"}
    softhsm.create_token(directory, label=TOKEN_LABEL, pin=PIN, so_pin=SO_PIN)
    public = softhsm.generate_keys(directory, module=softhsm_module(), label=TOKEN_LABEL, pin=PIN, keys=keys)
    (directory / "public_keys.json").write_text(json.dumps(public))
    return directory


_templates: dict[str, Path] = {}


def shared_template_token(make_directory: Callable[[], Path]) -> Path:
    """The template token of this process (a test session), built in ``make_directory()`` the first time."""
    if "template" not in _templates:
        _templates["template"] = build_template_token(make_directory())
    return _templates["template"]


def template_public_keys(template: Path) -> dict[str, str]:
    """Public key PEM of every key on the template token (and so on every copy), by label."""
    keys: dict[str, str] = json.loads((template / "public_keys.json").read_text())
    return keys


def make_token_env(template: Path, directory: Path) -> TokenEnv:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(template / "tokens", directory / "tokens")
    conf = softhsm.write_softhsm_conf(directory)
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    te = TokenEnv(dir=directory, softhsm_conf=conf, pin_file=pin_file, config=directory / "agent.toml")
    te.write_config()
    return te


@contextlib.contextmanager
def short_tempdir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is limited to 107 bytes; pytest's tmp paths are long)."""
    d = Path(tempfile.mkdtemp(prefix="da-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------
# Running the CLI and the agent


def run_cli(
    te: TokenEnv | None,
    *args: str,
    config: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``python -m agent [--config te.config] ARGS`` with ``te``'s environment (``env`` is added to it), from
    the checkout, its output captured as text. ``config=False`` leaves ``--config`` out; without ``te`` it
    runs in this process's environment. Its stdin is ``input``, or empty (never a terminal)."""
    full_env = {**(te.env() if te is not None else os.environ), **(env or {})}
    before = ["--config", str(te.config)] if te is not None and config else []
    return subprocess.run(
        [sys.executable, "-m", "agent", *before, *args],
        env=full_env,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


class AgentProcess:
    """``dfns-agent serve`` in a child process, as a user would run it."""

    def __init__(
        self, token_env: TokenEnv, socket_path: Path, *, verbose: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.token_env = token_env
        self.socket_path = socket_path
        self.log_path = token_env.dir / f"agent-{secrets.token_hex(3)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(token_env.config)]
            + (["--verbose"] if verbose else [])
            + ["serve", "--socket", str(socket_path)],
            env={**token_env.env(), **(env or {})},
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


@contextlib.contextmanager
def agent_starter(directory: Path) -> Iterator[Callable[..., AgentProcess]]:
    """``start(te, wait=True, socket_path=None, env=None)`` starts an agent (socket under ``directory`` by
    default, ``env`` added to its environment); on exit every agent started is stopped, must have ended
    cleanly and never printed the PIN."""
    started: list[AgentProcess] = []

    def start(
        te: TokenEnv, *, wait: bool = True, socket_path: Path | None = None, env: dict[str, str] | None = None
    ) -> AgentProcess:
        a = AgentProcess(te, socket_path or directory / "run" / "agent.sock", env=env)
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


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


def child_pids(pid: int) -> set[int]:
    """The live child processes of ``pid`` (an agent's workers)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(fields[0]) for fields in (line.split() for line in out.splitlines()) if not fields[1].startswith("Z")}


def wait_all_workers(agent: AgentProcess, workers: int, timeout: float = 30.0) -> set[int]:
    """Wait until an agent with ``workers`` pre-forked workers has started all of them, and return their pids.

    An agent answers ``/v1/health`` as soon as its first worker serves, while the supervisor starts the
    others one after another; what holds for all of them holds only once the supervisor logs ``N workers
    serving`` (every worker reported ready; the same moment as its READY=1 under systemd)."""
    wait_until(
        lambda: agent.proc.poll() is not None or f"{workers} workers serving" in agent.output(),
        timeout,
        f"the supervisor to start {workers} workers",
    )
    assert agent.proc.poll() is None, f"agent exited with {agent.proc.returncode}:\n{agent.output()}"
    pids = child_pids(agent.proc.pid)
    assert len(pids) == workers, (pids, agent.output())
    return pids


@dataclass
class Signed:
    """What :func:`sign_concurrently` got back: (credential, challenge, firstFactor) per answered signature,
    a line per failure (status and body, or the transport error), and how long it all took."""

    results: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def sign_concurrently(
    socket_path: Path, cred_ids: Mapping[str, str], kinds: Sequence[str], clients: int, per_client: int
) -> Signed:
    """``clients`` threads, each with its own keep-alive connection, each signing ``per_client`` challenges
    with the credentials ``kinds`` (in turn, each client starting at its own place)."""
    out = Signed()
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://a", timeout=60) as http:
            for i in range(per_client):
                kind = kinds[(n + i) % len(kinds)]
                challenge = make_challenge(cred_ids[kind])
                try:
                    r = http.post("/v1/sign", json={"challenge": challenge, "credential": kind})
                except httpx.HTTPError as e:
                    with lock:
                        out.failures.append(f"{kind}: {e!r}")
                    continue
                with lock:
                    if r.status_code == 200:
                        out.results.append((kind, challenge, r.json()))
                    else:
                        out.failures.append(f"{kind}: {r.status_code} {r.text}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.elapsed = time.monotonic() - started
    return out


def wait_answering(agent: AgentProcess, timeout: float = 20.0) -> httpx.Response:
    """The first answer of ``GET /v1/health`` with any status (an agent that is down answers 503)."""
    answers: list[httpx.Response] = []

    def answered() -> bool:
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.output()}")
        try:
            answers.append(agent.http.get("/v1/health"))
        except httpx.TransportError:
            return False
        return True

    wait_until(answered, timeout, "the agent to answer")
    return answers[0]


def agent_processes(config: Path) -> set[int]:
    """Every live process started with ``config`` on its command line (an agent and its workers, orphaned
    or not): what a test that stopped its agent expects to be none."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if os.fsencode(config) in argv and state != "Z":
            found.add(int(entry.name))
    return found


# ------------------------------------------------------------------------------------------------------
# Dfns challenges and verification


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_challenge(*allowed: str) -> dict[str, Any]:
    """An /auth/action/init answer shaped like Dfns's."""
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


# ------------------------------------------------------------------------------------------------------
# A service account of the dev Dfns server, with a software key


PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def new_key(kind: str) -> PrivateKey:
    """A software key of ``kind`` (ed25519, p256, secp256k1 or rsa2048)."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "secp256k1":
        return ec.generate_private_key(ec.SECP256K1())
    if kind == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    raise AssertionError(kind)


def pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign(key: PrivateKey, data: bytes) -> bytes:
    """The Dfns encoding (§3): raw Ed25519, DER ECDSA/SHA-256, RSA PKCS#1 v1.5/SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def client_data(challenge: str, kind: str = "key.get") -> bytes:
    return compact({"challenge": challenge, "type": kind}).encode()


class DfnsUser:
    """A service account talking to the dev Dfns server the way the agent's users do."""

    def __init__(self, base_url: str, account: ServiceAccount, key: PrivateKey) -> None:
        self.account = account
        self.key = key
        self.cred_id = account.cred_id
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {account.token}"}, timeout=10)

    def init(self, method: str, path: str, payload: str) -> dict[str, Any]:
        body = {"userActionHttpMethod": method, "userActionHttpPath": path, "userActionPayload": payload}
        resp = self.http.post("/auth/action/init", json={**body, "userActionServerKind": "Api"})
        assert resp.status_code == 200, resp.text
        result: dict[str, Any] = resp.json()
        return result

    def complete(
        self,
        challenge: dict[str, Any],
        *,
        data: bytes | None = None,
        signature: bytes | None = None,
        key: PrivateKey | None = None,
        cred_id: str | None = None,
    ) -> httpx.Response:
        data = client_data(challenge["challenge"]) if data is None else data
        signature = sign(key or self.key, data) if signature is None else signature
        assertion = {"credId": cred_id or self.cred_id, "clientData": b64url(data), "signature": b64url(signature)}
        return self.http.post(
            "/auth/action",
            json={
                "challengeIdentifier": challenge["challengeIdentifier"],
                "firstFactor": {"kind": "Key", "credentialAssertion": assertion},
            },
        )

    def user_action(self, method: str, path: str, payload: str, **kw: Any) -> str:
        resp = self.complete(self.init(method, path, payload), **kw)
        assert resp.status_code == 200, resp.text
        token: str = resp.json()["userAction"]
        return token

    def call(
        self, method: str, path: str, body: Any = None, *, content: bytes | None = None, ua: str | None = None
    ) -> httpx.Response:
        """A signed mutation: payload and body are the same serialised bytes (the agent's rule)."""
        content = (compact(body).encode() if body is not None else b"{}") if content is None else content
        ua = self.user_action(method, path, content.decode()) if ua is None else ua
        headers = {"X-DFNS-USERACTION": ua, "Content-Type": "application/json"}
        return self.http.request(method, path, content=content, headers=headers)

    def register(self, new_key: PrivateKey, cred_id: str, *, bad_signature: bool = False) -> httpx.Response:
        """Register ``new_key`` as a Key credential (§4.2), user-action signed by the current credential."""
        resp = self.http.post("/auth/credentials/init", json={"kind": "Key"})
        assert resp.status_code == 200, resp.text
        challenge = resp.json()
        data = client_data(challenge["challenge"], "key.create")
        public = pem(new_key)
        fingerprint = compact({"clientDataHash": hashlib.sha256(data).hexdigest(), "publicKey": public}).encode()
        signature = sign(new_key if not bad_signature else self.key, fingerprint)
        attestation = compact({"publicKey": public, "signature": signature.hex()}).encode()
        body = {
            "credentialKind": "Key",
            "credentialInfo": {"credId": cred_id, "clientData": b64url(data), "attestationData": b64url(attestation)},
            "credentialName": f"cred-{cred_id[:8]}",
            "challengeIdentifier": challenge["challengeIdentifier"],
        }
        return self.call("POST", "/auth/credentials", body)


# ------------------------------------------------------------------------------------------------------
# The SDK tests' world: a dev Dfns server and an agent


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


# ------------------------------------------------------------------------------------------------------
# systemd's side of the notify protocol


class Notifications:
    """The receiving end of $NOTIFY_SOCKET, recording each datagram with the pid that sent it."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.seen: list[tuple[int, list[str]]] = []

    def receive(self, timeout: float) -> tuple[int, list[str]] | None:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", cdata[:12])[0]
        message = (pid, data.decode().split("\n"))
        self.seen.append(message)
        return message

    def wait_for(self, line: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> list[str]:
        """The next message containing ``line`` (messages before it are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.receive(0.2)
            if got is not None and line in got[1]:
                return got[1]
            if got is None and proc is not None and proc.poll() is not None:
                raise AssertionError(f"agent exited with {proc.returncode} before sending {line}")
        raise AssertionError(f"no {line} within {timeout}s; seen {self.seen}")

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------------------------------
# Prometheus text


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    """Prometheus text format -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


# --- another uid on the same host, and a full disk -------------------------------------------------------

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # clients run as nobody, who cannot read this checkout's virtualenv


def open_to_everyone(socket_path: Path) -> None:
    """Open the socket up the way a deployment sharing it with a group would; the policy must still decide."""
    for directory in socket_path.parents:
        if str(directory) in ("/", "/tmp"):
            break
        os.chmod(directory, 0o755)
    os.chmod(socket_path, 0o666)


def run_as_nobody(script: str, *args: str, timeout: float = 60.0) -> str:
    """Run ``script`` with the system's python3 as uid and gid nobody; its standard output (it must exit 0)."""
    r = subprocess.run(
        [SYSTEM_PYTHON, "-c", script, *args],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@contextmanager
def files_cannot_grow_past(size: int) -> Iterator[None]:
    """Writes to regular files fail with EFBIG beyond ``size`` bytes, and a write that crosses it comes up
    short (a full disk, as the kernel says it), for this process, until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
