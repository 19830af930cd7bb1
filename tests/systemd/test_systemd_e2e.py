"""The README's systemd deployment, run word for word under a real systemd (252, PID 1 in systemd-nspawn).

The shell blocks of README.md marked ``<!-- systemd-deploy: NAME -->`` are extracted and run as root in a
fresh Debian 12 container (tests/systemd/nspawn.py); ``pip install dfns-agent`` there installs the wheel
built from this checkout (the container's /etc/pip.conf points pip at a local wheel directory). Then,
against the deployed service: socket activation, signing through the socket for 20 s without a 503,
reload of a good and a bad config, stops under load with slow clients (nothing lost) more often than a
start limit would allow, a wrong PIN tried exactly once while a client waits on the socket, the watchdog,
doctor as the README prints it (and without sudo), and the sandbox's exposure score.

The tests share one container, deployed and started by the fixture (the README's install, softhsm and
start blocks), and each leaves the service serving, so any one of them runs alone (``-k``). Skipped, with
the reason, only where nspawn cannot run (not root, tools missing).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nspawn
import pytest

from agent.dev.testing import ROOT, check_assertion, make_challenge, wait_until

SOCKET = "/run/dfns-agent/agent.sock"
CONFIG = "/etc/dfns-agent/agent.toml"
UNIT = "dfns-agent.service"
DEPLOY = "/root/deploy"
PY = "/opt/dfns-agent/bin/python"
AGENT_TOML = f"""\
[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "dfns"

[server]
socket = "{SOCKET}"
workers = 2

[[credential]]
name = "default"
key = "dfns-ed25519"
"""
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".dev", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "node_modules"
)


def readme_blocks() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- systemd-deploy: (\w+) -->\n```sh\n(.*?)```", text, re.S))
    assert set(blocks) == {"install", "softhsm", "start", "dfns", "user"}, sorted(blocks)
    return blocks


def wheelhouse(work: Path) -> Path:
    """This checkout's wheel, plus its dependencies' wheels (cached per dependency list)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = pyproject[pyproject.index("dependencies = [") : pyproject.index("]", pyproject.index("dependencies = ["))]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-{hashlib.sha256(deps.encode()).hexdigest()[:12]}"
    cached = nspawn.CACHE / f"wheels-{tag}"
    out = work / "wheels"
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation"]
    if not cached.exists():
        tmp = cached.with_name(cached.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([*pip, "-w", str(tmp), str(src)], check=True, timeout=900)
        for own in tmp.glob("dfns_agent-*.whl"):
            own.unlink()
        tmp.rename(cached)
    shutil.copytree(cached, out)
    subprocess.run([*pip, "--no-deps", "-w", str(out), str(src)], check=True, timeout=300)
    return out


class Deployment:
    def __init__(self, c: nspawn.Container, pin: str, blocks: dict[str, str]) -> None:
        self.c, self.pin, self.blocks = c, pin, blocks
        self.started: nspawn.Result | None = None  # what the README's start block printed

    def sh(self, script: str, **kw: Any) -> nspawn.Result:
        return self.c.run(script, **kw)

    def prop(self, prop: str, unit: str = UNIT) -> str:
        return self.sh(f"systemctl show -p {prop} --value {unit}").stdout.strip()

    def active(self, unit: str = UNIT) -> str:
        return self.sh(f"systemctl is-active {unit} || true").stdout.strip()

    def curl(self, path: str) -> Any:
        r = self.sh(f"curl -sf --max-time 30 --unix-socket {SOCKET} http://agent{path}", check=True)
        return json.loads(r.stdout)

    def credential(self) -> tuple[str, str]:
        (cred,) = self.curl("/v1/credentials")["credentials"][:1]
        return cred["credId"], cred["publicKey"]

    def load(self, *args: str, cred_id: str | None = None) -> subprocess.Popen[str]:
        """The load client in the container (tests/systemd/e2e_client.py) signing for ``cred_id``."""
        cred_id = cred_id or self.credential()[0]
        challenge = json.dumps(make_challenge(cred_id))
        argv = [PY, "/root/e2e_client.py", "--socket", SOCKET, "--challenge", challenge, *args]
        return self.c.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def journal(self, cursor: str, unit: str = UNIT) -> str:
        return self.sh(f"journalctl -u {unit} --no-pager -o cat --after-cursor={shlex.quote(cursor)}").stdout

    def cursor(self) -> str:
        out = self.sh("journalctl -n 0 --show-cursor --no-pager").stdout
        return out.strip().splitlines()[-1].removeprefix("-- cursor: ")

    def serving(self) -> bool:
        r = self.sh(f"curl -sf --max-time 10 --unix-socket {SOCKET} http://agent/v1/health || true")
        try:
            return bool(json.loads(r.stdout)["status"] == "ok")
        except (ValueError, KeyError, TypeError):
            return False


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    reason = nspawn.unavailable()
    if reason is not None:
        print(f"SKIP systemd end-to-end test: {reason}")
        pytest.skip(reason)
    t0 = time.monotonic()
    nspawn.build_rootfs()
    work = tmp_path_factory.mktemp("e2e")
    wheels = wheelhouse(work)
    c = nspawn.Container(work)
    try:
        c.boot()
        t_boot = time.monotonic()
        shutil.copytree(wheels, c.path("/opt/wheels"))
        c.path("/etc/pip.conf").write_text("[global]\nno-index = true\nfind-links = /opt/wheels\n")
        shutil.copy(nspawn.HERE / "e2e_client.py", c.path("/root/e2e_client.py"))
        pin = hashlib.sha256(str(time.time()).encode()).hexdigest()[:8]
        deploy = c.path(DEPLOY)
        deploy.mkdir()
        (deploy / "agent.toml").write_text(AGENT_TOML)
        (deploy / "pin").write_text(pin + "\n")
        blocks = readme_blocks()
        d = Deployment(c, pin, blocks)
        for name in ("install", "softhsm"):
            d.sh(f"cd {DEPLOY}\n{blocks[name]}", timeout=600, check=True)
        # The start block too, here rather than in its test: every test needs a started deployment.
        d.started = d.sh(f"cd {DEPLOY}\n{blocks['start']}", timeout=300)
        if d.started.returncode == 0:  # its doctor connected: the socket is starting the service
            wait_until(lambda: d.active() == "active", 60, "the service activated by the socket")
        took = time.monotonic() - t_boot
        print(f"container booted in {t_boot - t0:.1f}s (with rootfs and wheels), deployed in {took:.1f}s")
        yield d
    finally:
        if c.pid1:
            log = c.run(f"journalctl -u {UNIT} -u dfns-agent.socket --no-pager -n 60 -o short-monotonic").stdout
            print("journal (last lines):\n" + log)
        c.shutdown()


def test_readme_start_block_socket_activation_and_doctor(deployed: Deployment) -> None:
    d = deployed
    r = d.started
    assert r is not None
    print(r.out)
    assert r.returncode == 0, r.out
    assert "✗" not in r.stdout and "✓ unit:" in r.stdout and "✓ pin:" in r.stdout, r.stdout
    assert "✓ socket:" in r.stdout and "held by dfns-agent.socket" in r.stdout, r.stdout
    assert "/var/lib/dfns-agent/audit.jsonl" in r.stdout, r.stdout
    # The doctor's connection started the agent: socket activation, not `systemctl start`.
    wait_until(lambda: d.active() == "active", 60, "the service activated by the socket")
    assert d.prop("TriggeredBy") == "dfns-agent.socket"
    mode = d.sh(f"stat -c '%a %U %G' {SOCKET} /run/dfns-agent").stdout.split("\n")
    assert mode[0] == "600 dfns-agent dfns-agent" and mode[1].startswith("755 root"), mode
    # A stop leaves the socket listening, and the next client starts the agent again.
    d.sh(f"systemctl stop {UNIT}", check=True)
    assert d.active() == "inactive" and d.active("dfns-agent.socket") == "active"
    assert d.sh(f"test -S {SOCKET}").returncode == 0
    health = d.curl("/v1/health")
    assert health["status"] == "ok", health
    wait_until(lambda: d.active() == "active", 60, "READY=1 once every worker serves")


def test_signing_through_the_socket_for_20s_without_a_503(deployed: Deployment) -> None:
    d = deployed
    _, public = d.credential()
    cred_id, _ = d.credential()
    p = d.load("--clients", "4", "--seconds", "20")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    result = json.loads(out)
    print("20 s of signing:", result["outcomes"])
    assert set(result["outcomes"]) == {"200"}, result["outcomes"]
    assert result["outcomes"]["200"] > 100
    for sample in result["samples"]:
        ff = json.loads(sample)
        assert ff["kind"] == "Key" and ff["credentialAssertion"]["credId"] == cred_id
    # One full verification with cryptography, on a fresh challenge.
    challenge = make_challenge(cred_id)
    body = shlex.quote(json.dumps({"challenge": challenge}))
    r = d.sh(f"curl -sf --unix-socket {SOCKET} -H 'Content-Type: application/json' -d {body} http://agent/v1/sign")
    check_assertion(json.loads(r.stdout), challenge, public, cred_id)
    assert d.prop("NRestarts") == "0"


def test_reload_applies_a_good_config_in_every_worker_and_fails_on_a_bad_one(deployed: Deployment) -> None:
    d = deployed
    good = AGENT_TOML + '\n[[credential]]\nname = "second"\nkey = "dfns-ed25519"\n'
    d.c.path(CONFIG).write_text(good)
    pid = d.prop("MainPID")
    r = d.sh(f"systemctl reload {UNIT}")
    assert r.returncode == 0, r.out
    for _ in range(12):  # new connections land on either worker: every one has it
        assert [c["name"] for c in d.curl("/v1/credentials")["credentials"]] == ["default", "second"]
    cursor = d.cursor()
    d.c.path(CONFIG).write_text(good + "\n[[credential]]\nname = 'broken'\n")  # no key: refused
    r = d.sh(f"systemctl reload {UNIT}")
    print("reload of a bad config:", r.returncode, r.out.strip())
    assert r.returncode != 0
    assert "reload_failed" in d.journal(cursor), d.journal(cursor)
    assert d.active() == "active" and d.prop("MainPID") == pid
    assert [c["name"] for c in d.curl("/v1/credentials")["credentials"]] == ["default", "second"]
    d.c.path(CONFIG).write_text(AGENT_TOML)
    assert d.sh(f"systemctl reload {UNIT}").returncode == 0


def test_stops_under_load_lose_nothing_and_outnumber_the_start_limit(deployed: Deployment) -> None:
    d = deployed
    until = "/root/stop-load"
    d.sh(f"rm -f {until}")
    p = d.load("--clients", "6", "--pause", "0.02", "--until", until)
    wait_until(lambda: d.serving(), 30, "the agent answering under load")
    cycles = 8  # more than any StartLimitBurst=5 in 120 s would allow
    t0 = time.monotonic()
    for _ in range(cycles):
        time.sleep(1.0)  # load on a running agent
        assert d.sh(f"systemctl stop {UNIT}").returncode == 0
        wait_until(lambda: d.active() == "active", 60, "the waiting clients re-activating the service")
    time.sleep(1.0)
    d.c.path(until).write_text("")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    outcomes = json.loads(out)["outcomes"]
    print(f"{cycles} stops in {time.monotonic() - t0:.1f}s under load (half the clients pause 20 ms):", outcomes)
    assert set(outcomes) == {"200"}, outcomes  # nothing lost, nothing refused
    assert d.active("dfns-agent.socket") == "active" and d.sh(f"test -S {SOCKET}").returncode == 0


def test_a_wrong_pin_is_tried_once_with_a_client_waiting(deployed: Deployment) -> None:
    d = deployed
    cred_id, _ = d.credential()
    d.sh(f"systemctl stop {UNIT}", check=True)
    d.c.path("/etc/credstore/dfns-agent.pin").write_text("wrong-pin\n")
    cursor = d.cursor()
    # One client connects and waits (that starts the agent), then keeps trying for a few seconds.
    waiting = d.load("--clients", "1", "--seconds", "5", cred_id=cred_id)
    wait_until(lambda: d.active("dfns-agent.socket") == "inactive", 60, "the socket stopped after the PIN failed")
    wait_until(lambda: d.active() == "failed", 60, "the service failed")
    waiting.communicate(timeout=60)
    d.sh("journalctl --sync")  # what the agent wrote before it exited is in the journal now
    wait_until(lambda: "pin_incorrect" in d.journal(cursor), 30, "the PIN refusal in the journal")
    log = d.journal(cursor)
    attempts = log.count("pin_incorrect")
    print(f"PIN attempts with a client waiting: {attempts}; exit status {d.prop('ExecMainStatus')}")
    assert attempts == 1, log
    assert d.prop("ExecMainStatus") == "77" and d.prop("NRestarts") == "0"
    assert d.sh(f"test -e {SOCKET}").returncode != 0  # nobody can start it until an operator does
    d.c.path("/etc/credstore/dfns-agent.pin").write_text(d.pin + "\n")
    d.sh("systemctl start dfns-agent.socket", check=True)  # the README's recovery step
    assert d.curl("/v1/health")["status"] == "ok"


def test_the_watchdog_restarts_a_stopped_agent(deployed: Deployment) -> None:
    d = deployed
    # Shorter timeouts for the test only (the shipped unit has WatchdogSec=30).
    dropin = d.c.path("/etc/systemd/system/dfns-agent.service.d/zz-test-watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=4\nTimeoutAbortSec=3\n")
    d.sh(f"systemctl daemon-reload && systemctl restart {UNIT}", check=True)
    old = d.prop("MainPID")
    d.sh(f"kill -STOP {old}", check=True)
    wait_until(lambda: d.prop("MainPID") not in (old, "0") and d.active() == "active", 60, "a restart by the watchdog")
    assert "watchdog" in d.sh(f"journalctl -u {UNIT} --no-pager -o cat | tail -30").stdout.lower()
    assert d.curl("/v1/health")["status"] == "ok"
    dropin.unlink()
    d.sh(f"systemctl daemon-reload && systemctl restart {UNIT}", check=True)


def test_doctor_without_sudo_reports_and_does_not_crash(deployed: Deployment) -> None:
    d = deployed
    d.sh("id alice >/dev/null 2>&1 || useradd --create-home alice", check=True)
    r = d.sh(f"cd /tmp && dfns-agent --config {CONFIG} doctor", user="alice")
    print(r.out)
    assert r.returncode == 1 and "Traceback" not in r.out, r.out
    assert "✗ config:" in r.stdout and "doctor --unit" in r.stdout, r.stdout
    r = d.sh(f"dfns-agent --config {CONFIG} doctor --unit {UNIT}", user="alice")
    assert r.returncode == 1 and "Traceback" not in r.out and "needs root" in r.stdout, r.out


def test_the_sandbox_exposure(deployed: Deployment) -> None:
    d = deployed
    r = d.sh(f"systemd-analyze security {UNIT} --no-pager")
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout).group(1))  # type: ignore[union-attr]
    print(f"systemd-analyze security {UNIT}: {score}")
    assert score <= 1.0, r.stdout
    assert d.prop("PrivateUsers") == "no"
    assert d.prop("MemoryDenyWriteExecute") == "yes"


def test_user_units_serve_and_try_a_wrong_pin_once(deployed: Deployment) -> None:
    """The README's per-user deployment under a user manager (lingering user), then the PIN rule there."""
    d = deployed
    d.sh("id bob >/dev/null 2>&1 || useradd --create-home bob; loginctl enable-linger bob", check=True)
    uid = d.sh("id -u bob", check=True).stdout.strip()
    wait_until(lambda: d.active(f"user@{uid}.service") == "active", 60, "bob's user manager")
    deploy = d.c.path("/home/bob/deploy")
    deploy.mkdir()
    toml = AGENT_TOML.replace(f'socket = "{SOCKET}"\n', "")
    env = '[token.module_env]\nSOFTHSM2_CONF = "/home/bob/.config/softhsm2.conf"\n'
    toml = toml.replace('label = "dfns"\n', 'label = "dfns"\n' + env)
    (deploy / "agent.toml").write_text(toml)
    (deploy / "pin").write_text(d.pin + "\n")
    d.sh("chown -R bob: /home/bob/deploy", check=True)
    login = f"export XDG_RUNTIME_DIR=/run/user/{uid}; cd ~/deploy\n"
    r = d.sh(login + d.blocks["user"], user="bob", timeout=300)
    assert r.returncode == 0, r.out
    sock = f"/run/user/{uid}/dfns-agent/agent.sock"
    user_ctl = f"XDG_RUNTIME_DIR=/run/user/{uid} systemctl --user"
    health = d.sh(f"curl -sf --max-time 30 --unix-socket {sock} http://agent/v1/health", user="bob")
    assert json.loads(health.stdout)["status"] == "ok", health.out  # the first connection started it
    # The first worker that is up answers; the unit is active once every worker is (READY=1).
    wait_until(
        lambda: d.sh(f"{user_ctl} is-active dfns-agent.service", user="bob").stdout.strip() == "active",
        60,
        "READY=1 from the user service",
    )
    d.sh(f"{user_ctl} stop dfns-agent.service", user="bob", check=True)
    d.c.path("/home/bob/.config/dfns-agent/pin").write_text("wrong-pin\n")
    cursor = d.cursor()
    d.sh(f"curl -s --max-time 30 --unix-socket {sock} http://agent/v1/health || true", user="bob")

    def socket_state() -> str:
        return d.sh(f"{user_ctl} is-active dfns-agent.socket || true", user="bob").stdout.strip()

    wait_until(lambda: socket_state() == "inactive", 60, "the user socket stopped after the PIN failed")
    d.sh("journalctl --sync")
    journal = f"journalctl _UID={uid} --no-pager -o cat --after-cursor={shlex.quote(cursor)}"
    wait_until(lambda: "pin_incorrect" in d.sh(journal).stdout, 30, "the PIN refusal in the journal")
    log = d.sh(journal).stdout
    attempts = log.count("pin_incorrect")
    print(f"user units: PIN attempts with a client waiting: {attempts}")
    assert attempts == 1, log
    status = d.sh(f"{user_ctl} show -p ExecMainStatus --value dfns-agent.service", user="bob").stdout.strip()
    assert status == "77"


def test_the_dfns_flow_deployment_with_the_token_credential_and_the_network_drop_in(
    deployed: Deployment, tmp_path: Path
) -> None:
    """The README's Dfns step, against the local Dfns-compatible server on the host (the container shares
    the host's network; the unit alone has none): the token arrives as the credential dfns-token."""
    d = deployed
    cred_id, public = d.credential()
    (tmp_path / "dev.pem").write_text(public)
    dev = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/dfns-agent"),
            "dev-dfns",
            "--port",
            "0",
            "--service-account",
            f"dev={tmp_path / 'dev.pem'}",
            "--tokens-dir",
            str(tmp_path / "tokens"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert dev.stdout is not None
        url = re.search(r"listening on (http://\S+)", dev.stdout.readline()).group(1)  # type: ignore[union-attr]
        dev.stdout.readline()  # the account line: the token file is written
        shutil.copy(tmp_path / "tokens" / "dev.token", d.c.path(f"{DEPLOY}/dfns-token"))
        d.c.path(CONFIG).write_text(AGENT_TOML + f'\n[credential.dfns]\nbase_url = "{url}"\n')
        r = d.sh(f"cd {DEPLOY}\n{d.blocks['dfns']}", timeout=120)
        assert r.returncode == 0, r.out
        body = shlex.quote(json.dumps({"method": "POST", "path": "/wallets", "body": {"network": "Ethereum"}}))
        r = d.sh(f"curl -s -w '\\n%{{http_code}}' --unix-socket {SOCKET} -d {body} http://agent/v1/request")
        answer, status = r.stdout.rsplit("\n", 1)
        print("POST /wallets through the agent and the dev Dfns:", status, answer[:120])
        assert status == "200", r.out
        assert json.loads(answer)["network"] == "Ethereum"
        doctor = d.sh(f"dfns-agent --config {CONFIG} doctor --unit {UNIT}")
        assert doctor.returncode == 0, doctor.out
        assert "dfns-token (/etc/credstore/dfns-agent.dfns-token)" in doctor.stdout, doctor.stdout
        assert "✓ dfns token default: from systemd credential dfns-token" in doctor.stdout, doctor.stdout
    finally:
        dev.terminate()
        dev.wait(10)
