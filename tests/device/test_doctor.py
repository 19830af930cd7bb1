"""``dfns-agent doctor`` on real SoftHSM token copies, each run in its own process (PKCS#11 modules are
loaded once per process, and the doctor is a CLI command)."""

from __future__ import annotations

import grp
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from agent.dev.dfns_server import DevDfns, DevDfnsServer
from agent.dev.testing import (
    NOBODY,
    PIN,
    ROOT,
    SYSTEM_PYTHON,
    TOKEN_LABEL,
    AgentProcess,
    TokenEnv,
    key_label,
    make_token_env,
    run_cli,
    softhsm_module,
)

MODULE = softhsm_module()


def run_doctor(te: TokenEnv, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = run_cli(te, "--config", str(config or te.config), "doctor", config=False, timeout=60)
    assert PIN not in r.stdout + r.stderr, "the PIN appeared in the doctor's output"
    assert not r.stderr.strip(), r.stderr
    return r


def checks(out: str) -> list[tuple[str, str, str]]:
    """Top-level lines as (mark, name, text); indented fix/warning lines are left out."""
    found = []
    for line in out.splitlines():
        if not line or line.startswith(" "):
            continue
        mark, rest = line.split(" ", 1)
        name, _, text = rest.partition(": ")
        found.append((mark, name, text))
    return found


def line(out: str, name: str) -> tuple[str, str]:
    """(mark, text) of the check called ``name``, its fix and warning lines included."""
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if ln and not ln.startswith(" ") and ln.split(" ", 1)[1].startswith(f"{name}: "):
            block = [ln]
            for more in lines[i + 1 :]:
                if not more.startswith("  "):
                    break
                block.append(more)
            return ln.split(" ", 1)[0], "\n".join(block)
    raise AssertionError(f"no {name!r} line in:\n{out}")


def socket_conf(short_dir: Path) -> str:
    return f'socket = "{short_dir / "run" / "agent.sock"}"'


def test_all_pass_in_the_issues_order(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(server=socket_conf(short_dir))
    r = run_doctor(token_env)
    assert r.returncode == 0, r.stdout
    found = checks(r.stdout)
    assert all(mark == "✓" for mark, _, _ in found), r.stdout
    names = [name for _, name, _ in found]
    keys = [f"key {k}" for k in ("ed25519", "p256", "secp256k1", "rsa2048", "rsa3072")]
    assert names == ["module", "token", "pin", *keys, "socket", "config", "audit log"], names
    assert "fix:" not in r.stdout
    assert "SoftHSM" in line(r.stdout, "module")[1]
    assert TOKEN_LABEL in line(r.stdout, "token")[1]
    assert "will be created with mode 0700" in line(r.stdout, "socket")[1]
    assert "sensitive, not extractable" in line(r.stdout, "key ed25519")[1]


def test_wrong_pin_is_tried_once_and_later_steps_skipped(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.pin_file.write_text("wrong-pin-0000\n")
    token_env.write_config(server=socket_conf(short_dir))
    r = run_doctor(token_env)
    assert r.returncode == 1
    assert r.stdout.count("rejected") == 1, r.stdout
    mark, text = line(r.stdout, "pin")
    assert mark == "✗" and "NOT retried" in text and "lockout" in text and "fix:" in text
    assert "- keys: skipped (needs pin)" in r.stdout
    assert "wrong-pin-0000" not in r.stdout
    assert line(r.stdout, "module")[0] == "✓" and line(r.stdout, "socket")[0] == "✓"
    # One attempt only: the right PIN still works afterwards, so the token counted at most one failure.
    token_env.pin_file.write_text(PIN + "\n")
    again = run_doctor(token_env)
    assert again.returncode == 0, again.stdout
    assert "had counted wrong PIN attempts" in line(again.stdout, "pin")[1]  # SoftHSM sets USER_PIN_COUNT_LOW


def test_group_readable_pin_file(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.pin_file.chmod(0o640)
    token_env.write_config(server=socket_conf(short_dir))
    r = run_doctor(token_env)
    assert r.returncode == 1
    mark, text = line(r.stdout, "pin")
    assert mark == "✗" and "0640" in text and f"chmod 600 {token_env.pin_file}" in text, text
    assert "- keys: skipped (needs pin)" in r.stdout


def test_unknown_token_label_lists_the_tokens_present(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(server=socket_conf(short_dir))
    token_env.config.write_text(token_env.config.read_text().replace(f'label = "{TOKEN_LABEL}"', 'label = "nope"'))
    r = run_doctor(token_env)
    assert r.returncode == 1
    mark, text = line(r.stdout, "token")
    assert mark == "✗" and f"'{TOKEN_LABEL}' (serial" in text and "slot ids change" in text and "serial" in text
    assert "- pin: skipped (needs token)" in r.stdout and "- keys: skipped (needs token)" in r.stdout
    assert line(r.stdout, "config")[0] == "✓"


def test_missing_module(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(server=socket_conf(short_dir))
    token_env.config.write_text(token_env.config.read_text().replace(MODULE, "/nonexistent/libpkcs11.so"))
    r = run_doctor(token_env)
    assert r.returncode == 1
    mark, text = line(r.stdout, "module")
    assert mark == "✗" and "does not exist" in text and "fix:" in text
    for step in ("token", "pin", "keys"):
        assert f"- {step}: skipped (needs module)" in r.stdout
    # The PIN file is still checked, without the token.
    assert line(r.stdout, "pin file")[0] == "✓"


def test_module_that_cannot_initialize(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(server=socket_conf(short_dir))
    missing = token_env.dir / "no-such-softhsm2.conf"
    token_env.config.write_text(token_env.config.read_text().replace(str(token_env.softhsm_conf), str(missing)))
    r = run_doctor(token_env)
    mark, text = line(r.stdout, "module")
    assert r.returncode == 1 and mark == "✗" and f"SOFTHSM2_CONF is {missing}" in text, text
    assert "- token: skipped (needs module)" in r.stdout


def test_missing_key_label(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(
        server=socket_conf(short_dir), extra_credentials='\n[[credential]]\nname = "gone"\nkey = "no-such-key"\n'
    )
    r = run_doctor(token_env)
    assert r.returncode == 1
    mark, text = line(r.stdout, "key gone")
    assert mark == "✗" and "no-such-key" in text and key_label("ed25519") in text, text
    assert line(r.stdout, "key ed25519")[0] == "✓"
    assert [m for m, _, _ in checks(r.stdout)].count("✗") == 1


def make_p256_key(te: TokenEnv, label: str, key_id: bytes, *, sensitive: bool, extractable: bool, sign: bool) -> None:
    """A P-256 key pair on the token with the private key's attributes as given, which ``keys generate``
    never makes (python-pkcs11 in a child process: this one must not load SoftHSM against the token)."""
    script = (
        "import pkcs11\n"
        "from pkcs11 import Attribute, KeyType\n"
        f"tok = pkcs11.lib({MODULE!r}).get_token(token_label={TOKEN_LABEL!r})\n"
        f"with tok.open(user_pin={PIN!r}, rw=True) as s:\n"
        "    p256 = {Attribute.EC_PARAMS: bytes.fromhex('06082a8648ce3d030107')}\n"
        "    params = s.create_domain_parameters(KeyType.EC, p256, local=True)\n"
        f"    params.generate_keypair(store=True, label={label!r}, id={key_id!r}, private_template="
        f"{{Attribute.SENSITIVE: {sensitive}, Attribute.EXTRACTABLE: {extractable}, Attribute.SIGN: {sign}}})\n"
    )
    subprocess.run([sys.executable, "-c", script], env=te.env(), check=True, capture_output=True, cwd=ROOT)


def test_extractable_key(token_env: TokenEnv, short_dir: Path) -> None:
    make_p256_key(token_env, "key-export", b"\x01\x02", sensitive=False, extractable=True, sign=True)
    token_env.write_config(
        server=socket_conf(short_dir), extra_credentials='\n[[credential]]\nname = "export"\nkey = "key-export"\n'
    )
    r = run_doctor(token_env)
    assert r.returncode == 1
    mark, text = line(r.stdout, "key export")
    assert mark == "✗" and "EXTRACTABLE" in text and "not SENSITIVE" in text and "keys generate" in text, text


def test_socket_directory_open_to_others(token_env: TokenEnv, short_dir: Path) -> None:
    (short_dir / "run").mkdir(mode=0o755)
    (short_dir / "run").chmod(0o755)
    token_env.write_config(server=socket_conf(short_dir))
    r = run_doctor(token_env)
    assert r.returncode == 1
    mark, text = line(r.stdout, "socket")
    assert mark == "✗" and "0755" in text and f"chmod 700 {short_dir / 'run'}" in text


def test_stale_socket_file(token_env: TokenEnv, short_dir: Path) -> None:
    import socket

    (short_dir / "run").mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(short_dir / "run" / "agent.sock"))
    s.close()  # bound, never listening: what a crashed agent leaves
    token_env.write_config(server=socket_conf(short_dir))
    r = run_doctor(token_env)
    assert r.returncode == 1
    mark, text = line(r.stdout, "socket")
    assert mark == "✗" and "stale" in text and "remove it or just start the agent, which replaces it" in text


def test_socket_path_too_long(token_env: TokenEnv) -> None:
    token_env.write_config(server=f'socket = "/tmp/{"x" * 110}/agent.sock"')
    r = run_doctor(token_env)
    mark, text = line(r.stdout, "socket")
    assert r.returncode == 1 and mark == "✗" and "107" in text


def test_running_agent_on_the_socket(token_env: TokenEnv, short_dir: Path, start_agent: Any) -> None:
    token_env.write_config(server=socket_conf(short_dir))
    agent: AgentProcess = start_agent(token_env, socket_path=short_dir / "run" / "agent.sock")
    r = run_doctor(token_env)
    assert r.returncode == 0, r.stdout
    mark, text = line(r.stdout, "socket")
    assert mark == "✓" and "an agent is running on it: status ok" in text and TOKEN_LABEL in text
    assert agent.http.get("/v1/health").status_code == 200  # the doctor's login did not disturb it


def _dfns_credential(te: TokenEnv, base_url: str) -> str:
    token_file = te.dir / "dfns.token"
    token_file.write_text("secret-bearer-token-123\n")
    token_file.chmod(0o600)
    return (
        f'\n[[credential]]\nname = "flow"\nkey = "{key_label("ed25519")}"\n'
        f'[credential.dfns]\nbase_url = "{base_url}"\ntoken_file = "{token_file}"\n'
    )


def test_dfns_unreachable_on_loopback_says_nothing_is_listening(token_env: TokenEnv, short_dir: Path) -> None:
    token_env.write_config(
        server=socket_conf(short_dir), extra_credentials=_dfns_credential(token_env, "http://127.0.0.1:9")
    )
    r = run_doctor(token_env)
    assert r.returncode == 1
    assert "secret-bearer-token-123" not in r.stdout
    assert line(r.stdout, "dfns token flow")[0] == "✓"
    mark, text = line(r.stdout, "dfns flow")
    assert mark == "✗" and "127.0.0.1:9" in text
    assert "nothing is listening on 127.0.0.1:9" in text and "./softhsm_setup.sh dev-dfns" in text, text
    assert "HTTPS_PROXY" not in text and "DNS" not in text, text
    assert checks(r.stdout)[-1][1] == "dfns flow"  # the last step


def test_dfns_failing_otherwise_gives_network_advice(token_env: TokenEnv, short_dir: Path) -> None:
    """A host that accepts and hangs up (not a refusal): DNS, proxy and systemd advice, as for a remote host."""
    import socket
    import threading

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def hang_up() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        token_env.write_config(server=socket_conf(short_dir), extra_credentials=_dfns_credential(token_env, url))
        r = run_doctor(token_env)
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)
    mark, text = line(r.stdout, "dfns flow")
    assert r.returncode == 1 and mark == "✗", r.stdout
    assert "HTTPS_PROXY" in text and "DNS" in text and "RestrictAddressFamilies" in text and "AF_INET6" in text
    assert "nothing is listening" not in text


def _public_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_dfns_reachable_and_token_accepted(token_env: TokenEnv, short_dir: Path) -> None:
    dfns = DevDfns()
    dfns.create_service_account("doctor", _public_pem(), token="secret-bearer-token-123")
    with DevDfnsServer(dfns) as server:
        token_env.write_config(server=socket_conf(short_dir), extra_credentials=_dfns_credential(token_env, server.url))
        r = run_doctor(token_env)
    assert r.returncode == 0, r.stdout
    assert "secret-bearer-token-123" not in r.stdout
    mark, text = line(r.stdout, "dfns flow")
    assert mark == "✓" and "reachable and accepts the token" in text, text
    # One authenticated read, nothing that changes state.
    assert dfns.requests == [{"method": "GET", "path": "/auth/credentials", "user_action": False}], dfns.requests


def test_dfns_rejecting_the_token_fails(token_env: TokenEnv, short_dir: Path) -> None:
    with DevDfnsServer(DevDfns()) as server:  # knows no token at all: 401
        token_env.write_config(server=socket_conf(short_dir), extra_credentials=_dfns_credential(token_env, server.url))
        r = run_doctor(token_env)
    assert r.returncode == 1, r.stdout
    assert "secret-bearer-token-123" not in r.stdout
    mark, text = line(r.stdout, "dfns flow")
    assert mark == "✗" and "reachable but rejected the token" in text and "HTTP 401" in text, text
    assert f"fix: the token from file {token_env.dir / 'dfns.token'} is wrong or expired" in text, text


def test_dfns_refusing_the_token_fails(token_env: TokenEnv, short_dir: Path) -> None:
    dfns = DevDfns()
    dfns.create_service_account("doctor", _public_pem(), token="secret-bearer-token-123")
    dfns.inject_fault("/auth/credentials", method="GET", status=403)
    with DevDfnsServer(dfns) as server:
        token_env.write_config(server=socket_conf(short_dir), extra_credentials=_dfns_credential(token_env, server.url))
        r = run_doctor(token_env)
    mark, text = line(r.stdout, "dfns flow")
    assert r.returncode == 1 and mark == "✗" and "refused the token" in text and "HTTP 403" in text, text
    assert "not allowed to read /auth/credentials" in text, text


def test_dfns_without_a_readable_token_is_only_probed(token_env: TokenEnv, short_dir: Path) -> None:
    dfns = DevDfns()
    with DevDfnsServer(dfns) as server:
        extra = _dfns_credential(token_env, server.url)
        (token_env.dir / "dfns.token").chmod(0o644)  # refused as a source: no token to send
        token_env.write_config(server=socket_conf(short_dir), extra_credentials=extra)
        r = run_doctor(token_env)
    assert line(r.stdout, "dfns token flow")[0] == "✗"
    mark, text = line(r.stdout, "dfns flow")
    assert mark == "✓" and "reachable; token not checked" in text, text
    assert dfns.requests == [{"method": "GET", "path": "/", "user_action": False}], dfns.requests


def test_missing_dfns_token(token_env: TokenEnv, short_dir: Path) -> None:
    extra = _dfns_credential(token_env, "http://127.0.0.1:9")
    (token_env.dir / "dfns.token").chmod(0o644)
    token_env.write_config(server=socket_conf(short_dir), extra_credentials=extra)
    r = run_doctor(token_env)
    mark, text = line(r.stdout, "dfns token flow")
    assert r.returncode == 1 and mark == "✗" and "chmod 600" in text
    assert "secret-bearer-token-123" not in r.stdout


def test_invalid_toml_stops_after_config(token_env: TokenEnv) -> None:
    token_env.config.write_text("[token\nmodule = 1\n")
    r = run_doctor(token_env)
    assert r.returncode == 1
    found = checks(r.stdout)
    assert [(m, n) for m, n, _ in found] == [("✗", "config")], r.stdout
    assert "not valid TOML" in r.stdout and "fix:" in r.stdout


def destroy_private_key(te: TokenEnv, label: str) -> None:
    """Delete a key pair's private half from the token copy, behind a running agent's back (own process:
    this one must not load SoftHSM)."""
    script = (
        "import pkcs11\n"
        "from pkcs11 import Attribute, ObjectClass\n"
        f"tok = pkcs11.lib({MODULE!r}).get_token(token_label={TOKEN_LABEL!r})\n"
        f"with tok.open(user_pin={PIN!r}, rw=True) as s:\n"
        f"    found = list(s.get_objects({{Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: {label!r}}}))\n"
        "    assert len(found) == 1, found\n"
        "    found[0].destroy()\n"
    )
    subprocess.run([sys.executable, "-c", script], env=te.env(), check=True, capture_output=True, cwd=ROOT)


def test_degraded_agent_on_the_socket_gives_the_agents_reason(
    token_env: TokenEnv, short_dir: Path, start_agent: Any
) -> None:
    token_env.write_config(server=socket_conf(short_dir))
    agent: AgentProcess = start_agent(token_env, socket_path=short_dir / "run" / "agent.sock")
    destroy_private_key(token_env, key_label("ed25519"))
    health = agent.http.get("/v1/health").json()
    assert health["status"] == "degraded", health
    reason = health["reason"]
    assert "'ed25519' not found or changed" in reason, reason
    r = run_doctor(token_env)
    assert r.returncode == 1
    mark, text = line(r.stdout, "socket")
    assert mark == "✗" and "an agent is running on it: status degraded" in text, text
    assert f"({reason})" in text and "no reason given" not in text, text
    assert "journalctl -u dfns-agent" in text


def test_report_renders_marks_fixes_and_skips_with_an_ascii_fallback() -> None:
    import io

    from agent.cli.doctor import Report
    from agent.diagnostics.results import failed, passed, skipped

    results = [
        passed("module", "ok", "a warning"),
        failed("pin", "rejected", "put the right PIN"),
        skipped("keys", "pin"),
    ]
    for encoding, yes, no in (("utf-8", "✓", "✗"), ("ascii", "OK", "FAIL")):
        out = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
        report = Report(out)
        for check in results:
            report.add(check)
        out.seek(0)
        assert out.read().splitlines() == [
            f"{yes} module: ok",
            "  warning: a warning",
            f"{no} pin: rejected",
            "  fix: put the right PIN",
            "- keys: skipped (needs pin)",
        ]
        assert not report.ok


def test_checkpoint_key(token_env: TokenEnv, short_dir: Path) -> None:
    """``[audit] checkpoint_key``: serve refuses to start without a dedicated Ed25519/P-256 key, so the doctor
    checks it too, signing one checkpoint and verifying it."""
    made = run_cli(token_env, "keys", "generate", "--type", "ed25519", "--label", "audit-ckpt")
    assert made.returncode == 0, made.stderr

    def doctor_with(key: str) -> tuple[str, str]:
        token_env.write_config(
            server=socket_conf(short_dir), extra_top=f'checkpoint_key = "{key}"\ncheckpoint_origin = "ci.example/a"\n'
        )
        r = run_doctor(token_env)
        mark, text = line(r.stdout, "checkpoint key")
        assert r.returncode == (0 if mark == "✓" else 1), r.stdout
        return mark, text

    mark, text = doctor_with("audit-ckpt")
    assert mark == "✓" and "ci.example/a" in text and "sha256:" in text, text
    mark, text = doctor_with(key_label("p256"))
    assert mark == "✗" and "is a credential's key" in text and "keys generate" in text, text
    mark, text = doctor_with("no-such-key")
    assert mark == "✗" and "no-such-key" in text and "audit-ckpt" in text, text
    rsa = run_cli(token_env, "keys", "generate", "--type", "rsa2048", "--label", "audit-rsa")
    assert rsa.returncode == 0, rsa.stderr
    mark, text = doctor_with("audit-rsa")
    assert mark == "✗" and "Ed25519 or P-256" in text, text
    # A P-256 key the token will not sign with (CKA_SIGN false).
    make_p256_key(token_env, "audit-nosign", b"\x09", sensitive=True, extractable=False, sign=False)
    mark, text = doctor_with("audit-nosign")
    assert mark == "✗" and "CKA_SIGN" in text, text
    # The same key as a credential's: refused by the key check (as serve refuses it), not an unexpected error.
    token_env.write_config(
        server=socket_conf(short_dir), extra_credentials='\n[[credential]]\nname = "nosign"\nkey = "audit-nosign"\n'
    )
    r = run_doctor(token_env)
    mark, text = line(r.stdout, "key nosign")
    assert r.returncode == 1 and mark == "✗" and "does not allow signing (CKA_SIGN is false)" in text, text
    # No setting makes it sign: the fix is a replacement key, not [token] allow_other_usages.
    assert "keys generate --type p256" in text and "allow_other_usages" not in text, text


def run_doctor_unit(
    te: TokenEnv, bin_dir: Path, show: str, unit_text: str = "", python: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``doctor --unit`` against a stand-in ``systemctl`` that prints ``show`` for ``systemctl show`` and
    ``unit_text`` for ``systemctl cat``: the unit's settings without a running systemd. ``python``: the
    interpreter (``PYTHON``) and its ``PYTHONPATH``, when the unit's user cannot run this one."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "show").write_text(show)
    (bin_dir / "cat").write_text(unit_text)
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\ncase "$1" in show|cat) exec cat "{bin_dir}/$1" ;; esac\nexit 1\n')
    fake.chmod(0o755)
    env = {**te.env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", **(python or {})}
    argv = [
        env.pop("PYTHON", sys.executable),
        "-m",
        "agent",
        "--config",
        str(te.config),
        "doctor",
        "--unit",
        "t.service",
    ]
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert PIN not in r.stdout + r.stderr, "the PIN appeared in the doctor's output"
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="doctor --unit needs root (CI runs as root)")


@needs_root
def test_unit_with_protect_system_strict_fails_where_it_cannot_write(
    token_env: TokenEnv, short_dir: Path, tmp_path: Path
) -> None:
    """The doctor runs outside the unit's mount namespace: an audit log (and the token, the state and the
    socket directories) the unit's ProtectSystem=strict leaves read-only is a failure, not "will be created"."""
    token_env.write_config(server=socket_conf(short_dir))
    show = "LoadState=loaded\nUser=\nProtectSystem=strict\nReadWritePaths=\nStateDirectory=\n"
    r = run_doctor_unit(token_env, tmp_path / "bin", show)
    mark, text = line(r.stdout, "audit log")
    assert r.returncode == 1 and mark == "✗" and "ProtectSystem=strict" in text, r.stdout
    assert f"ReadWritePaths={token_env.dir}" in text and "systemctl edit t.service" in text, text
    mark, text = line(r.stdout, "sandbox")
    assert mark == "✗" and f"{token_env.dir / 'tokens'} (SoftHSM tokens)" in text, text
    assert f"{short_dir / 'run'} (socket)" in text and "(reload status)" in text, text
    # Opened by ReadWritePaths= (its "-" prefix as systemctl shows it), everything passes.
    opened = show.replace("ReadWritePaths=", f"ReadWritePaths=-{token_env.dir} -{short_dir}")
    r = run_doctor_unit(token_env, tmp_path / "bin", opened)
    assert r.returncode == 0, r.stdout
    assert (
        f"writable: reload status {token_env.dir / 'state' / 'dfns-agent'} (ReadWritePaths=-{token_env.dir})"
        in (line(r.stdout, "sandbox")[1])
    ), r.stdout


def python_for_nobody() -> dict[str, str] | None:
    """An interpreter nobody can run this checkout with: this one, else the system's python3 (of the same
    version) with this virtualenv's packages, e.g. when this one lives under /root; None if neither works."""
    packages = sysconfig.get_paths()["purelib"]
    for python in ({}, {"PYTHON": SYSTEM_PYTHON, "PYTHONPATH": f"{ROOT}:{packages}"}):
        argv = [python.get("PYTHON", sys.executable), "-c", "import agent.cli.doctor, pkcs11"]
        env = {**os.environ, **{k: v for k, v in python.items() if k != "PYTHON"}}
        try:
            r = subprocess.run(argv, user=NOBODY, group=NOBODY, cwd="/", env=env, capture_output=True, timeout=60)
        except OSError:
            continue
        if r.returncode == 0:
            return python
    return None


@needs_root
def test_unit_supplementary_groups_are_applied(template_token: Path, short_dir: Path, tmp_path: Path) -> None:
    """User=nobody reaches a token only its group may use through SupplementaryGroups= (as systemd sets it)."""
    try:
        group = grp.getgrnam("daemon")
    except KeyError:
        pytest.skip("needs the group daemon")
    python = python_for_nobody()
    if python is None or "nobody" in group.gr_mem or os.getgrouplist("nobody", NOBODY).count(group.gr_gid):
        pytest.skip("needs nobody outside the group daemon, and able to run this checkout")
    short_dir.chmod(0o755)
    te = make_token_env(template_token, short_dir / "hsm")
    te.write_config(server=socket_conf(short_dir), pin="")  # the PIN from the credential "pin"
    os.chown(te.dir, NOBODY, -1)  # the audit log's directory
    (short_dir / "run").mkdir(mode=0o700)
    os.chown(short_dir / "run", NOBODY, -1)
    for p in [te.dir / "tokens", *(te.dir / "tokens").rglob("*")]:  # like /var/lib/softhsm/tokens: root:softhsm
        os.chown(p, 0, group.gr_gid)
        p.chmod(0o2770 if p.is_dir() else 0o660)
    show = "LoadState=loaded\nUser=nobody\nGroup=\nSupplementaryGroups=\nProtectSystem=no\n"
    unit_text = f"[Service]\nLoadCredential=pin:{te.pin_file}\n"
    r = run_doctor_unit(te, tmp_path / "bin", show, unit_text, python)
    assert r.returncode == 1 and line(r.stdout, "module")[0] + line(r.stdout, "token")[0] != "✓✓", r.stdout
    r = run_doctor_unit(
        te, tmp_path / "bin", show.replace("SupplementaryGroups=", "SupplementaryGroups=daemon"), unit_text, python
    )
    assert r.returncode == 0, r.stdout
    assert "runs as nobody, supplementary groups daemon" in line(r.stdout, "unit")[1], r.stdout
    assert line(r.stdout, "pin")[0] == "✓" and line(r.stdout, "key ed25519")[0] == "✓", r.stdout
