"""The agent as a process: signing through its Unix socket, every error status, socket hygiene, start-up."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature

from agent.dev.testing import (
    KINDS,
    PIN,
    AgentProcess,
    TokenEnv,
    b64url_decode,
    check_assertion,
    cred_id_for,
    key_label,
    make_challenge,
    make_token_env,
    run_cli,
    running_agent,
    softhsm_module,
    verify_signature,
    wait_until,
)

ORIGIN = "https://app.dfns.io"
ORIGIN_CRED = "Y2ktb3JpZ2lu"


@pytest.fixture(scope="module")
def shared(template_token: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for the read-only tests of this module (each test still uses fresh challenges)."""
    te = make_token_env(template_token, tmp_path_factory.mktemp("shared") / "hsm")
    te.write_config(
        extra_credentials=f'\n[[credential]]\nname = "with-origin"\nkey = "{key_label("p256")}"\n'
        f'cred_id = "{ORIGIN_CRED}"\norigin = "{ORIGIN}"\n'
    )
    with running_agent(te) as a:
        yield a


def public_keys(a: AgentProcess) -> dict[str, str]:
    r = a.http.get("/v1/credentials")
    assert r.status_code == 200
    return {c["name"]: c["publicKey"] for c in r.json()["credentials"]}


def assert_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return str(body["error"]["message"])


# ------------------------------------------------------------------------------------------------------
# Signing


@pytest.mark.parametrize("kind", KINDS)
def test_every_key_type_signs_through_the_socket(shared: AgentProcess, kind: str) -> None:
    challenge = make_challenge(cred_id_for(kind))
    r = shared.post("/v1/sign", {"challenge": challenge, "credential": kind})
    assert r.status_code == 200, r.text
    data = check_assertion(r.json(), challenge, public_keys(shared)[kind], cred_id_for(kind))
    assert data == f'{{"challenge":"{challenge["challenge"]}","type":"key.get"}}'.encode()


def test_signatures_are_fresh_and_bound_to_the_challenge(shared: AgentProcess) -> None:
    pem = public_keys(shared)["p256"]
    c1, c2 = make_challenge(cred_id_for("p256")), make_challenge(cred_id_for("p256"))
    a1 = shared.post("/v1/sign", {"challenge": c1, "credential": "p256"}).json()["credentialAssertion"]
    a2 = shared.post("/v1/sign", {"challenge": c2, "credential": "p256"}).json()["credentialAssertion"]
    # The first signature does not verify over the second challenge's clientData.
    with pytest.raises(InvalidSignature):
        verify_signature(pem, b64url_decode(a1["signature"]), b64url_decode(a2["clientData"]))


def test_origin_credential_uses_the_seed_client_data_form(shared: AgentProcess) -> None:
    challenge = make_challenge(ORIGIN_CRED)
    r = shared.post("/v1/sign", {"challenge": challenge, "credential": "with-origin"})
    assert r.status_code == 200, r.text
    data = check_assertion(r.json(), challenge, public_keys(shared)["with-origin"], ORIGIN_CRED)
    c = challenge["challenge"]
    assert data == f'{{"type":"key.get","challenge":"{c}","origin":"{ORIGIN}","crossOrigin":false}}'.encode()


def test_without_a_name_the_first_allowed_credential_signs(shared: AgentProcess) -> None:
    challenge = make_challenge("someone-else", cred_id_for("secp256k1"))
    r = shared.post("/v1/sign", {"challenge": challenge})
    assert r.status_code == 200, r.text
    check_assertion(r.json(), challenge, public_keys(shared)["secp256k1"], cred_id_for("secp256k1"))


def test_register_returns_a_verifiable_credential_info(shared: AgentProcess) -> None:
    challenge = {
        "kind": "Key",
        "challenge": "Y2gtcmVnaXN0ZXI",
        "challengeIdentifier": "eyJhbGciOi.reg",
        "user": {"id": "us-1", "name": "sa", "displayName": "sa"},
        "attestation": "none",
        "pubKeyCredParams": [],
    }
    r = shared.post("/v1/register", {"challenge": challenge, "credential": "ed25519", "credentialName": "hsm-key"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["credentialKind"] == "Key"
    assert body["credentialName"] == "hsm-key"
    assert body["challengeIdentifier"] == "eyJhbGciOi.reg"
    info = body["credentialInfo"]
    assert info["credId"] == cred_id_for("ed25519")
    client_data = b64url_decode(info["clientData"])
    assert client_data == b'{"challenge":"Y2gtcmVnaXN0ZXI","type":"key.create"}'
    attestation = json.loads(b64url_decode(info["attestationData"]))
    pem = public_keys(shared)["ed25519"]
    assert attestation["publicKey"] == pem
    fingerprint = json.dumps(
        {"clientDataHash": hashlib.sha256(client_data).hexdigest(), "publicKey": pem}, separators=(",", ":")
    ).encode()
    verify_signature(pem, bytes.fromhex(attestation["signature"]), fingerprint)


def test_register_with_an_explicit_cred_id(shared: AgentProcess) -> None:
    challenge = {"kind": "Key", "challenge": "Y2gtcm90YXRl", "challengeIdentifier": "x"}
    r = shared.post("/v1/register", {"challenge": challenge, "credential": "rsa2048", "credId": "bmV3LWtleQ"})
    assert r.status_code == 200, r.text
    assert r.json()["credentialInfo"]["credId"] == "bmV3LWtleQ"
    assert r.json()["credentialName"] == "rsa2048"


def test_credentials_lists_every_configured_credential(shared: AgentProcess) -> None:
    creds = {c["name"]: c for c in shared.http.get("/v1/credentials").json()["credentials"]}
    assert set(creds) == set(KINDS) | {"with-origin"}
    for kind in KINDS:
        assert creds[kind]["keyType"] == kind
        assert creds[kind]["credId"] == cred_id_for(kind)
        assert creds[kind]["keyLabel"] == key_label(kind)
        assert creds[kind]["publicKey"].startswith("-----BEGIN PUBLIC KEY-----\n")
    assert creds["with-origin"]["origin"] == ORIGIN


def test_health_reports_token_login_and_keys(shared: AgentProcess) -> None:
    r = shared.http.get("/v1/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok"
    assert h["token"]["present"] and h["token"]["loggedIn"]
    assert h["token"]["label"] == "agent-test"
    assert h["keys"] == {name: True for name in [*KINDS, "with-origin"]}


# ------------------------------------------------------------------------------------------------------
# Errors: a JSON envelope, a stable code, the right status, and the agent keeps serving


def _raw(a: AgentProcess, method: str, path: str, content: bytes) -> httpx.Response:
    return a.http.request(method, path, content=content, headers={"content-type": "application/json"})


ERROR_CASES: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/v1/sign", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/sign", b"", 400, "invalid_json"),
    ("POST", "/v1/sign", b"[1, 2]", 400, "invalid_json"),
    ("POST", "/v1/sign", b"\xff\xfe", 400, "invalid_json"),
    ("POST", "/v1/sign", {}, 400, "invalid_request"),
    ("POST", "/v1/sign", {"challenge": {}, "extra": 1}, 400, "invalid_request"),
    ("POST", "/v1/sign", {"challenge": {"challenge": "Y2g"}, "credential": 7}, 400, "invalid_request"),
    ("POST", "/v1/sign", {"challenge": {"challenge": "Y2g"}, "credential": ""}, 400, "invalid_request"),
    ("POST", "/v1/sign", {"challenge": "Y2g"}, 400, "invalid_challenge"),
    ("POST", "/v1/sign", {"challenge": {"challenge": ""}}, 400, "invalid_challenge"),
    ("POST", "/v1/sign", {"challenge": {"challenge": "not base64url!"}}, 400, "invalid_challenge"),
    ("POST", "/v1/sign", {"challenge": {"challenge": "Y2g", "allowCredentials": []}}, 400, "invalid_challenge"),
    (
        "POST",
        "/v1/sign",
        {"challenge": {"challenge": "Y2g", "allowCredentials": {"key": [{}]}}},
        400,
        "invalid_challenge",
    ),
    ("POST", "/v1/sign", {"challenge": {"challenge": "Y" * 5000}}, 400, "invalid_challenge"),
    ("POST", "/v1/sign", {"challenge": make_challenge("x"), "credential": "nobody"}, 404, "unknown_credential"),
    ("POST", "/v1/register", {"challenge": {"challenge": "Y2g"}}, 400, "invalid_request"),
    (
        "POST",
        "/v1/register",
        {"challenge": {"challenge": "Y2g", "kind": "Fido2"}, "credential": "p256"},
        400,
        "invalid_challenge",
    ),
    ("POST", "/v1/register", {"challenge": {"challenge": "Y2g"}, "credential": "ghost"}, 404, "unknown_credential"),
    ("GET", "/v1/nothing-here", None, 404, "not_found"),
    ("GET", "/", None, 404, "not_found"),
    ("GET", "/v1/sign", None, 405, "method_not_allowed"),
    ("DELETE", "/v1/health", None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), ERROR_CASES)
def test_bad_requests_get_a_clear_json_error(
    shared: AgentProcess, method: str, path: str, body: Any, status: int, code: str
) -> None:
    content = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    assert_error(_raw(shared, method, path, content), status, code)
    assert shared.http.get("/v1/health").json()["status"] == "ok"


def test_credential_not_allowed_names_what_was_allowed(shared: AgentProcess) -> None:
    challenge = make_challenge("Y2ktYWxsb3dlZC0x", "Y2ktYWxsb3dlZC0y")
    msg = assert_error(
        shared.post("/v1/sign", {"challenge": challenge, "credential": "p256"}), 422, "credential_not_allowed"
    )
    assert "Y2ktYWxsb3dlZC0x" in msg and "Y2ktYWxsb3dlZC0y" in msg and cred_id_for("p256") in msg
    # With no credential named, the agent explains that none of its own is allowed.
    msg = assert_error(shared.post("/v1/sign", {"challenge": make_challenge("zzz")}), 422, "credential_not_allowed")
    assert "zzz" in msg


def test_oversized_body_is_413_and_the_agent_keeps_serving(shared: AgentProcess) -> None:
    body = json.dumps({"challenge": make_challenge("x"), "pad": "a" * 70_000}).encode()
    assert_error(_raw(shared, "POST", "/v1/sign", body), 413, "payload_too_large")
    challenge = make_challenge(cred_id_for("ed25519"))
    assert shared.post("/v1/sign", {"challenge": challenge}).status_code == 200


def test_token_gone_is_503_token_unavailable(token_env: TokenEnv, start_agent: Any) -> None:
    a: AgentProcess = start_agent(token_env)
    challenge = make_challenge(cred_id_for("p256"))
    assert a.post("/v1/sign", {"challenge": challenge}).status_code == 200
    shutil.rmtree(token_env.dir / "tokens")  # the "device" disappears under the running agent
    msg = assert_error(a.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256"))}), 503, "token_unavailable")
    assert "could not sign" in msg
    h = a.http.get("/v1/health")
    assert h.status_code == 503
    assert h.json()["status"] == "degraded" and h.json()["reason"]


# ------------------------------------------------------------------------------------------------------
# Socket and start-up


def test_socket_is_0600_in_a_0700_directory(shared: AgentProcess) -> None:
    assert stat.S_IMODE(os.stat(shared.socket_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(shared.socket_path).st_mode)
    assert stat.S_IMODE(os.stat(shared.socket_path.parent).st_mode) == 0o700


def test_curl_speaks_to_the_socket(shared: AgentProcess) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        [curl, "-sS", "--unix-socket", str(shared.socket_path), "http://agent/v1/health"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)["status"] == "ok"


def test_stale_socket_file_is_replaced(token_env: TokenEnv, start_agent: Any, short_dir: Path) -> None:
    path = short_dir / "run" / "agent.sock"
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays behind, nobody listens: what a crashed agent leaves
    a: AgentProcess = start_agent(token_env, socket_path=path)
    assert a.http.get("/v1/health").status_code == 200


def test_a_socket_in_a_shared_directory_is_refused_and_the_directory_left_alone(
    token_env: TokenEnv, start_agent: Any, short_dir: Path
) -> None:
    shared = short_dir / "tmp"  # like /tmp: world-writable and sticky
    shared.mkdir()
    shared.chmod(0o1777)
    a: AgentProcess = start_agent(token_env, wait=False, socket_path=shared / "agent.sock")
    assert a.proc.wait(20) != 0
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777  # the old agent made it 0700, for every user
    assert f"socket directory {shared} has mode 1777" in a.output() and "a directory of its own" in a.output()
    assert not (shared / "agent.sock").exists()


def test_a_live_agent_on_the_same_path_is_a_start_up_error(token_env: TokenEnv, start_agent: Any) -> None:
    first: AgentProcess = start_agent(token_env)
    second: AgentProcess = start_agent(token_env, wait=False, socket_path=first.socket_path)
    assert second.proc.wait(20) != 0
    assert "another agent is already listening" in second.output()
    assert first.post("/v1/sign", {"challenge": make_challenge(cred_id_for("ed25519"))}).status_code == 200


def test_a_file_in_the_way_is_not_clobbered(token_env: TokenEnv, start_agent: Any, short_dir: Path) -> None:
    path = short_dir / "agent.sock"
    path.write_text("precious")
    a: AgentProcess = start_agent(token_env, wait=False, socket_path=path)
    assert a.proc.wait(20) != 0
    assert "is not a socket" in a.output()
    assert path.read_text() == "precious"


def test_sigterm_stops_cleanly_and_removes_the_socket(token_env: TokenEnv, start_agent: Any) -> None:
    a: AgentProcess = start_agent(token_env)
    assert a.socket_path.exists()
    assert a.stop() == 0
    assert not a.socket_path.exists()
    out = a.output()
    assert "listening on" in out and "-----BEGIN PUBLIC KEY-----" in out


def _serve_once(te: TokenEnv, sock: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run_cli(te, "serve", "--socket", str(sock), timeout=timeout)


def test_wrong_pin_exits_non_zero_without_retrying(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.pin_file.write_text("000000-wrong\n")
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode != 0
    assert r.stderr.count("rejected the PIN") == 1
    assert "not retrying" in r.stderr
    assert "000000-wrong" not in r.stderr + r.stdout
    assert not (short_dir / "agent.sock").exists()


def test_group_readable_pin_file_is_refused(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.pin_file.chmod(0o640)
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode != 0
    assert "chmod 600" in r.stderr
    assert PIN not in r.stderr + r.stdout


def test_pin_from_environment_variable(token_env: TokenEnv, short_dir: Path, start_agent: Any) -> None:
    token_env.write_config(pin='env = "TEST_AGENT_PIN"\nprompt = false')
    os.environ["TEST_AGENT_PIN"] = PIN
    try:
        a: AgentProcess = start_agent(token_env)
    finally:
        del os.environ["TEST_AGENT_PIN"]
    assert a.http.get("/v1/health").json()["status"] == "ok"


def test_no_pin_source_and_no_terminal_is_a_clear_error(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(pin='env = "UNSET_AGENT_PIN_VARIABLE"')
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode != 0
    assert "no PIN available" in r.stderr and "no terminal" in r.stderr


def test_missing_key_is_a_start_up_error(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(extra_credentials='\n[[credential]]\nname = "ghost"\nkey = "no-such-label"\n')
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode != 0
    assert "no private key labelled 'no-such-label'" in r.stderr


TWINS = (
    f'\n[[credential]]\nname = "plain"\nkey = "{key_label("secp256k1")}"\n'
    f'\n[[credential]]\nname = "web"\nkey = "{key_label("secp256k1")}"\norigin = "https://app.dfns.io"\n'
)


@pytest.mark.parametrize("workers", [1, 2])
def test_two_credentials_on_one_key_that_sign_differently_are_a_start_up_error(
    token_env: TokenEnv, short_dir: Path, workers: int
) -> None:
    """Both would get the key's credId; which clientData form a challenge allowing it gets would depend on
    the order of the config."""
    token_env.write_config(extra_credentials=TWINS, server=f"workers = {workers}\n")
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode == 2, r.stderr  # a config error, also when a worker finds it (ExitStatus.CONFIG)
    assert "credentials 'plain' and 'web'" in r.stderr and "explicit, distinct cred_id" in r.stderr, r.stderr
    assert not (short_dir / "agent.sock").exists()


def test_two_credentials_on_one_key_that_sign_differently_are_refused_on_reload(
    token_env: TokenEnv, start_agent: Any
) -> None:
    agent: AgentProcess = start_agent(token_env)
    token_env.write_config(extra_credentials=TWINS)
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed; keeping the previous configuration" in agent.output(), 10, "the refusal")
    assert "credentials 'plain' and 'web'" in agent.output()
    assert "plain" not in agent.http.get("/v1/credentials").text
    assert agent.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256"))}).status_code == 200


def test_unknown_token_label_lists_what_is_there(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.config.write_text(token_env.config.read_text().replace('label = "agent-test"', 'label = "nope"'))
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode != 0
    assert "no token with label 'nope'" in r.stderr and "'agent-test'" in r.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_relative_or_missing_module_path_is_a_config_error(
    token_env: TokenEnv, short_dir: Path, workers: int
) -> None:
    """Exit status 2 (ExitStatus.CONFIG): the units do not restart the agent on it (RestartPreventExitStatus=)."""
    real = f'module = "{softhsm_module()}"'
    token_env.write_config(server=f"workers = {workers}\n")
    text = token_env.config.read_text()
    token_env.config.write_text(text.replace(real, 'module = "libsofthsm2.so"'))
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode == 2, r.stderr
    assert "'libsofthsm2.so'" in r.stderr and "absolute path" in r.stderr, r.stderr
    missing = token_env.dir / "no-such-module.so"
    token_env.config.write_text(text.replace(real, f'module = "{missing}"'))
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode == 2, r.stderr
    assert f"{missing} does not exist" in r.stderr, r.stderr
    assert not (short_dir / "agent.sock").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_start_up_failure_keeps_its_own_code_with_workers(token_env: TokenEnv, short_dir: Path, workers: int) -> None:
    """A worker's start-up error reaches the journal as itself, not as a token_error."""
    token_env.write_config(server=f"workers = {workers}\n")
    text = token_env.config.read_text().replace(str(token_env.audit_file), "/proc/no-such/audit.jsonl")
    token_env.config.write_text(text)
    r = _serve_once(token_env, short_dir / "agent.sock")
    assert r.returncode == 1, r.stderr
    assert "dfns-agent: audit_unavailable: cannot open audit log /proc/no-such/audit.jsonl" in r.stderr, r.stderr
    assert "token_error" not in r.stderr, r.stderr
