"""The dfns-agent command line, run as a user runs it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.dev.testing import (
    KINDS,
    PIN,
    ROOT,
    SPARE_KEY,
    AgentProcess,
    TokenEnv,
    check_assertion,
    cred_id_for,
    key_label,
    make_challenge,
    run_cli,
)


def cli(te: TokenEnv, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    r = run_cli(te, *args, input=stdin, timeout=60)
    assert PIN not in r.stdout + r.stderr
    return r


def test_keys_generate_list_public(token_env: TokenEnv) -> None:
    r = cli(token_env, "keys", "generate", "--type", "p256", "--label", "cli-new")
    assert r.returncode == 0, r.stderr
    assert "generated p256 key 'cli-new'" in r.stdout and "sha256:" in r.stdout

    table = cli(token_env, "keys", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["LABEL", "ID", "TYPE", "FINGERPRINT", "SENSITIVE", "EXTRACTABLE"]
    row = next(line.split() for line in lines if line.startswith("cli-new "))
    assert row[2] == "p256" and row[4:] == ["yes", "no"]

    listed = {k["label"]: k for k in json.loads(cli(token_env, "keys", "list", "--json").stdout)}
    assert set(listed) == {key_label(k) for k in KINDS} | {SPARE_KEY, "cli-new"}
    assert listed["cli-new"]["sensitive"] is True and listed["cli-new"]["extractable"] is False
    assert listed["cli-new"]["alwaysSensitive"] is True and listed["cli-new"]["neverExtractable"] is True

    pem = cli(token_env, "keys", "public", "--label", "cli-new")
    assert pem.returncode == 0
    key = serialization.load_pem_public_key(pem.stdout.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert listed["cli-new"]["fingerprint"] == "sha256:" + hashlib.sha256(spki).hexdigest()


def test_keys_generate_refuses_a_duplicate_label(token_env: TokenEnv) -> None:
    r = cli(token_env, "keys", "generate", "--type", "ed25519", "--label", key_label("ed25519"))
    assert r.returncode != 0
    assert "already exists" in r.stderr


def test_keys_public_of_a_missing_key(token_env: TokenEnv) -> None:
    r = cli(token_env, "keys", "public", "--label", "nope")
    assert r.returncode != 0
    assert "no private key labelled 'nope'" in r.stderr


def test_keys_list_shows_a_label_with_control_characters_escaped(token_env: TokenEnv) -> None:
    """A label is whatever the tool that made the key wrote; a terminal escape in it must not reach the terminal."""
    label = "red\x1b[31m\rspoof"
    assert cli(token_env, "keys", "generate", "--type", "p256", "--label", label).returncode == 0
    r = cli(token_env, "keys", "list")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\r" not in r.stdout
    assert repr(label) in r.stdout


def test_keys_public_refuses_an_empty_id(token_env: TokenEnv) -> None:
    """--id "" used to mean no id at all: the first key under the label, not the one asked for."""
    r = cli(token_env, "keys", "public", "--label", key_label("p256"), "--id", "")
    assert r.returncode == 2 and "--id" in r.stderr and "BEGIN PUBLIC KEY" not in r.stdout


def test_keys_generate_rejects_unknown_type(token_env: TokenEnv) -> None:
    r = cli(token_env, "keys", "generate", "--type", "p384", "--label", "x")
    assert r.returncode == 2
    assert "p384" in r.stderr


def test_sign_reads_a_challenge_and_prints_first_factor(agent: AgentProcess) -> None:
    te = agent.token_env
    challenge = make_challenge(cred_id_for("p256"))
    r = cli(te, "sign", "--socket", str(agent.socket_path), "--credential", "p256", stdin=json.dumps(challenge))
    assert r.returncode == 0, r.stderr
    pem = cli(te, "keys", "public", "--label", key_label("p256")).stdout
    check_assertion(json.loads(r.stdout), challenge, pem, cred_id_for("p256"))


def test_sign_uses_the_socket_from_the_config(agent: AgentProcess) -> None:
    te = agent.token_env
    te.write_config(server=f'socket = "{agent.socket_path}"')
    challenge = make_challenge(cred_id_for("ed25519"))
    r = cli(te, "sign", stdin=json.dumps(challenge))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["credentialAssertion"]["credId"] == cred_id_for("ed25519")


def test_sign_reports_agent_errors_with_their_code(agent: AgentProcess) -> None:
    r = cli(agent.token_env, "sign", "--socket", str(agent.socket_path), stdin=json.dumps(make_challenge("zzz")))
    assert r.returncode == 1
    assert "credential_not_allowed" in r.stderr and "zzz" in r.stderr


def test_sign_without_a_running_agent(token_env: TokenEnv, short_dir: Path) -> None:
    r = cli(token_env, "sign", "--socket", str(short_dir / "none.sock"), stdin=json.dumps(make_challenge("x")))
    assert r.returncode == 1
    assert "agent_unreachable" in r.stderr


def test_sign_rejects_non_json_stdin(token_env: TokenEnv, short_dir: Path) -> None:
    r = cli(token_env, "sign", "--socket", str(short_dir / "none.sock"), stdin="not json")
    assert r.returncode != 0
    assert "stdin is not JSON" in r.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path, token_env: TokenEnv) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(tmp_path / "none.toml"), "keys", "list"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert "cannot read configuration file" in r.stderr


def test_serve_without_credentials_is_a_config_error(token_env: TokenEnv, tmp_path: Path) -> None:
    text = token_env.config.read_text()
    token_env.config.write_text(text[: text.index("[[credential]]")])
    r = cli(token_env, "serve", "--socket", str(tmp_path / "a.sock"))
    assert r.returncode == 2
    assert "no [[credential]] configured" in r.stderr


def test_client_library_round_trip(agent: AgentProcess) -> None:
    from agent.client import AgentClient, AgentClientError

    with AgentClient(agent.socket_path) as client:
        creds = {c["name"]: c for c in client.credentials()}
        assert set(creds) == set(KINDS)
        challenge = make_challenge(cred_id_for("rsa3072"))
        ff = client.sign(challenge, "rsa3072")
        check_assertion(ff, challenge, creds["rsa3072"]["publicKey"], cred_id_for("rsa3072"))
        reg = client.register({"kind": "Key", "challenge": "Y2gtcmVn"}, "p256", credential_name="n")
        assert reg["credentialName"] == "n" and reg["credentialInfo"]["credId"] == cred_id_for("p256")
        assert client.health().ok
        with pytest.raises(AgentClientError) as caught:
            client.sign(make_challenge("x"), "missing")
        assert caught.value.status == 404 and caught.value.code == "unknown_credential"


def test_pin_prompt_on_a_terminal_does_not_echo(token_env: TokenEnv) -> None:
    """The last PIN source: a no-echo prompt on the controlling terminal (a real pty here)."""
    import os
    import pty
    import select
    import time

    token_env.write_config(pin="prompt = true")
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal
        os.execvpe(
            sys.executable,
            [sys.executable, "-m", "agent", "--config", str(token_env.config), "keys", "list"],
            token_env.env() | {"PYTHONPATH": str(ROOT)},
        )
    screen = b""
    deadline = time.monotonic() + 30

    def read_some() -> bool:
        nonlocal screen
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return False
            if not chunk:
                return False
            screen += chunk
        return True

    while b"PIN for token 'agent-test': " not in screen and time.monotonic() < deadline:
        assert read_some(), screen
    os.write(fd, PIN.encode() + b"\n")
    while time.monotonic() < deadline and read_some():
        pass
    _, status = os.waitpid(pid, 0)
    text = screen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert PIN not in text, "the PIN was echoed"
    assert key_label("p256") in text


def test_pin_from_a_systemd_credential(token_env: TokenEnv, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "hsm-pin").write_text(PIN)
    token_env.write_config(pin='credential = "hsm-pin"\nprompt = false')
    r = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(token_env.config), "keys", "list", "--json"],
        env=token_env.env() | {"CREDENTIALS_DIRECTORY": str(creds)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert key_label("ed25519") in {k["label"] for k in json.loads(r.stdout)}


def test_status_reports_health_credentials_and_signatures(agent: AgentProcess) -> None:
    for _ in range(3):
        agent.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256"))})
    r = cli(agent.token_env, "status", "--socket", str(agent.socket_path))
    assert r.returncode == 0, r.stderr
    assert ": ok" in r.stdout and "signatures: 3 ok" in r.stdout
    assert "✓ p256: p256 key 'key-p256'" in r.stdout
    doc = json.loads(cli(agent.token_env, "status", "--socket", str(agent.socket_path), "--json").stdout)
    assert doc["signatures"]["ok"] == 3 and doc["health"]["status"] == "ok" and len(doc["credentials"]) == 5


def test_status_without_an_agent(token_env: TokenEnv, short_dir: Path) -> None:
    r = cli(token_env, "status", "--socket", str(short_dir / "none.sock"))
    assert r.returncode == 1 and "agent_unreachable" in r.stderr


def test_config_after_the_command(token_env: TokenEnv) -> None:
    """``dfns-agent keys list --config X`` is ``dfns-agent --config X keys list``."""
    r = run_cli(token_env, "keys", "list", "--config", str(token_env.config), config=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert key_label("ed25519") in r.stdout
