"""Audit drills with real agents (2 workers) on SoftHSM: a full disk, signed checkpoints with a key on the
token, rewrite and truncation caught by ``dfns-agent audit verify``, and a refusal flood from another uid."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.core.audit import GENESIS, line_hash, verify
from agent.dev.testing import (
    NOBODY,
    SYSTEM_PYTHON,
    AgentProcess,
    TokenEnv,
    cred_id_for,
    make_challenge,
    open_to_everyone,
    run_as_nobody,
    run_cli,
    wait_all_workers,
    wait_until,
)

TWO_WORKERS = "workers = 2\n"
AUDIT_KEY = "audit-ed25519"


def records_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def fresh(agent: AgentProcess) -> httpx.Client:
    """A client on a new connection: the kernel spreads new connections over the workers."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://a", timeout=30)


def sign_fresh(agent: AgentProcess) -> httpx.Response:
    with fresh(agent) as http:
        body = {"challenge": make_challenge(cred_id_for("ed25519")), "credential": "ed25519"}
        return http.post("/v1/sign", json=body)


def health_statuses(agent: AgentProcess, connections: int = 16) -> list[tuple[int, str, str]]:
    out = []
    for _ in range(connections):
        with fresh(agent) as http:
            r = http.get("/v1/health")
            out.append((r.status_code, r.json()["status"], r.json().get("reason") or ""))
    return out


def use_audit_file(te: TokenEnv, path: Path, extra_audit: str = "") -> None:
    te.write_config(server=TWO_WORKERS, extra_top=extra_audit)  # lines of extra_top land in [audit]
    te.config.write_text(te.config.read_text().replace(str(te.audit_file), str(path)))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (needs root and mount; CI runs as root)."""
    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        reason = f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip() or r.returncode}"
        print(reason)
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_drill_keeps_the_chain_and_every_answered_signature(
    token_env: TokenEnv, start_agent: Any, small_disk: Path
) -> None:
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"b" * 40 * 1024)
    audit = small_disk / "audit.jsonl"
    use_audit_file(token_env, audit)
    agent: AgentProcess = start_agent(token_env)
    wait_all_workers(agent, 2)
    answered: list[str] = []
    withheld = 0
    for _ in range(400):  # until the disk is full: several refusals to sign in a row
        r = sign_fresh(agent)
        if r.status_code == 200:
            answered.append(r.json()["credentialAssertion"]["signature"])
            withheld = 0
            continue
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable", r.text
        assert "credentialAssertion" not in r.text
        withheld += 1
        if withheld == 6:
            break
    assert withheld == 6 and answered, (withheld, len(answered))
    # Every worker says the same while the log cannot take more records.
    during = health_statuses(agent)
    assert all(s == 503 and status == "down" and "cannot write audit log" in why for s, status, why in during), during
    ballast.unlink()  # space comes back
    wait_until(lambda: all(s == 200 for s, _, _ in health_statuses(agent, 8)), 20, "health ok on every worker")
    for _ in range(10):
        r = sign_fresh(agent)
        assert r.status_code == 200, r.text
        answered.append(r.json()["credentialAssertion"]["signature"])
    agent.stop()
    result = verify(audit)
    assert result.ok, result
    records = records_of(audit)  # every line parses
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[0]["prev"] == GENESIS
    signed = {r.get("signature") for r in records if r["event"] == "sign" and r["outcome"] == "ok"}
    from agent.dev.testing import b64url, b64url_decode

    recorded = {b64url(b64url_decode(s)) for s in signed if s}
    missing = [s for s in answered if b64url(b64url_decode(s)) not in recorded]
    assert not missing, f"{len(missing)} answered signature(s) without a record"
    cli = run_cli(None, "audit", "verify", str(audit))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    print(f"disk-full drill: {len(answered)} signatures answered, all recorded; {len(records)} records; {cli.stdout}")


def make_audit_key(te: TokenEnv, directory: Path) -> Path:
    """A dedicated Ed25519 key on the token for checkpoints; its public key PEM in a file."""
    made = run_cli(te, "keys", "generate", "--type", "ed25519", "--label", AUDIT_KEY)
    assert made.returncode == 0, made.stderr
    pem = run_cli(te, "keys", "public", "--label", AUDIT_KEY)
    assert pem.returncode == 0, pem.stderr
    path = directory / "audit-key.pem"
    path.write_text(pem.stdout)
    return path


CHECKPOINTS = (
    f'checkpoint_key = "{AUDIT_KEY}"\ncheckpoint_origin = "ci.example/dfns-agent/audit"\ncheckpoint_every = 5\n'
)


def test_signed_checkpoints_catch_truncation_and_rewrites(
    token_env: TokenEnv, start_agent: Any, tmp_path: Path
) -> None:
    public = make_audit_key(token_env, tmp_path)
    audit = tmp_path / "audit.jsonl"
    use_audit_file(token_env, audit, CHECKPOINTS)
    agent: AgentProcess = start_agent(token_env)
    wait_all_workers(agent, 2)
    for _ in range(23):
        assert sign_fresh(agent).status_code == 200
    agent.stop()  # each worker's last checkpoint at shutdown (the second finds the first one's and skips)
    journal = tmp_path / "journal.txt"
    journal.write_text(agent.output())  # the agent's log: where journald keeps the copies
    assert "audit checkpoint " in journal.read_text()
    records = records_of(audit)
    checkpoints = [r for r in records if r["event"] == "checkpoint"]
    # Every 5 records (a few may fold into one: they are signed on their own thread) and at shutdown.
    assert len(checkpoints) >= 2 and records[-1]["event"] == "checkpoint"
    newest = max(r["treeSize"] for r in checkpoints)
    assert all(r["event"] == "checkpoint" for r in records[newest:])  # it covers every request record
    verify_cli = ["audit", "verify", str(audit), "--public-key", str(public), "--checkpoints", str(journal)]
    ok = run_cli(None, *verify_cli)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    proven = f"proven: records 1..{newest} match a checkpoint signed by ci.example"
    assert proven in ok.stdout, ok.stdout

    original = audit.read_bytes()
    # Truncation: the last 6 records cut off. The chain alone is fine; the journal's checkpoints are not.
    audit.write_bytes(b"".join(original.splitlines(keepends=True)[:-6]))
    assert run_cli(None, "audit", "verify", str(audit)).returncode == 0
    cut = run_cli(None, *verify_cli)
    assert cut.returncode == 1 and "truncation" in cut.stdout, cut.stdout

    # Rewrite: one record edited and the chain recomputed, the checkpoints dropped (nobody can sign new ones).
    kept, prev = [], GENESIS
    for r in records:
        if r["event"] == "checkpoint":
            continue
        if r["seq"] == 3:
            r["caller"]["uid"] = 4242
        r["seq"], r["prev"] = len(kept) + 1, prev
        line = json.dumps(r, separators=(",", ":")).encode()
        prev = line_hash(line)
        kept.append(line + b"\n")
    audit.write_bytes(b"".join(kept))
    alone = run_cli(None, "audit", "verify", str(audit), "--public-key", str(public))
    assert alone.returncode == 0 and "not proven" in alone.stdout  # honest: the file alone cannot show it
    caught = run_cli(None, *verify_cli)
    assert caught.returncode == 1 and "not the one it signed" in caught.stdout, caught.stdout

    # An edit that keeps the in-file checkpoints: caught even without the journal.
    edited = original.replace(b'"credential":"ed25519"', b'"credential":"p256"', 1)
    audit.write_bytes(edited)
    assert run_cli(None, "audit", "verify", str(audit), "--public-key", str(public)).returncode == 1


def test_rotation_with_workers_keeps_one_chain(token_env: TokenEnv, start_agent: Any, tmp_path: Path) -> None:
    public = make_audit_key(token_env, tmp_path)
    directory = tmp_path / "log"
    use_audit_file(token_env, directory / "audit.jsonl", CHECKPOINTS + "rotate_bytes = 8192\n")
    agent: AgentProcess = start_agent(token_env)
    wait_all_workers(agent, 2)
    for _ in range(40):
        assert sign_fresh(agent).status_code == 200
    agent.stop()
    files = sorted(directory.glob("*.jsonl"))
    assert len(files) >= 3, files
    r = run_cli(None, "audit", "verify", str(directory), "--public-key", str(public))
    assert r.returncode == 0 and f"in {len(files)} file(s)" in r.stdout, r.stdout
    signs = [x for f in files for x in records_of(f) if x["event"] == "sign"]
    assert len(signs) == 40


FLOOD = r"""
import socket, sys
n = int(sys.argv[2])
refused = 0
for _ in range(n):  # a refused uid gets one 403 per connection, then the agent closes it
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sys.argv[1])
    try:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
    except BrokenPipeError:
        pass  # the answer may already be there, sent at accept
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    refused += got.count(b"HTTP/1.1 403")
print(refused)
"""


def test_a_refusal_flood_from_another_uid_writes_a_bounded_number_of_records(
    token_env: TokenEnv, start_agent: Any
) -> None:
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("the flood runs as another uid: needs root and /usr/bin/python3")
    token_env.write_config(server=TWO_WORKERS)
    agent: AgentProcess = start_agent(token_env)
    wait_all_workers(agent, 2)
    open_to_everyone(agent.socket_path)
    sent = 2000
    runs = []
    for _ in range(3):  # three client processes, each connecting to whichever worker the kernel picks
        runs.append(int(run_as_nobody(FLOOD, str(agent.socket_path), str(sent), timeout=120)))
    assert runs == [sent] * 3, runs  # every request got its 403
    agent.stop()  # the summaries of the open intervals are written at shutdown
    refused = [r for r in records_of(token_env.audit_file) if r["event"] == "refused"]
    # Per worker, one record per caller (here: per client process) and reason, plus one summary with the count;
    # each process's connections reach both workers.
    assert 3 <= len(refused) <= 3 * 2 * 2, len(refused)
    assert sum(r.get("count", 1) for r in refused) == 3 * sent
    assert {r["caller"]["uid"] for r in refused} == {NOBODY}
    assert verify(token_env.audit_file).ok
    size = token_env.audit_file.stat().st_size
    print(f"refusal flood: {3 * sent} refused requests -> {len(refused)} records, {size} bytes")


def test_kill_9_under_load_loses_no_audited_signature_and_the_chain_goes_on(
    token_env: TokenEnv, start_agent: Any, tmp_path: Path, short_dir: Path
) -> None:
    import signal
    import threading

    from agent.dev.testing import agent_processes, b64url, b64url_decode, child_pids

    public = make_audit_key(token_env, tmp_path)
    audit = tmp_path / "audit.jsonl"
    use_audit_file(token_env, audit, CHECKPOINTS)
    agent = AgentProcess(token_env, short_dir / "killed.sock")  # not start_agent's: it must not end cleanly
    agent.wait_ready()
    workers = wait_all_workers(agent, 2)
    answered: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                r = sign_fresh(agent)
            except httpx.TransportError:
                continue  # the worker died under this request: no answer, nothing to account for
            if r.status_code == 200:
                answered.append(r.json()["credentialAssertion"]["signature"])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answered) >= 60, 60, "60 signatures")
        os.kill(min(workers), signal.SIGKILL)  # one worker, in the middle of the load
        wait_until(lambda: "restarted (pid" in agent.output(), 30, "the restarted worker")
        count = len(answered)
        wait_until(lambda: len(answered) >= count + 60, 60, "60 more signatures")
        for pid in child_pids(agent.proc.pid) | {agent.proc.pid}:  # then the whole agent
            os.kill(pid, signal.SIGKILL)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        rc = agent.stop()
    assert rc == -signal.SIGKILL
    wait_until(lambda: not agent_processes(token_env.config), 20, "every killed process gone")
    records = records_of(audit)
    recorded = {b64url(b64url_decode(r["signature"])) for r in records if r.get("signature")}
    missing = [s for s in answered if b64url(b64url_decode(s)) not in recorded]
    assert not missing and len(answered) >= 120, (len(missing), len(answered))
    first = run_cli(None, "audit", "verify", str(audit), "--public-key", str(public))
    assert first.returncode == 0, first.stdout
    # Restarted on the same file: the chain (and seq) go on, a torn tail, if the kill left one, is repaired.
    again: AgentProcess = start_agent(token_env)
    for _ in range(5):
        assert again.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256"))}).status_code == 200
    again.stop()
    after = records_of(audit)
    assert [r["seq"] for r in after] == list(range(1, len(after) + 1))
    newest = max(r["treeSize"] for r in after if r["event"] == "checkpoint")
    assert all(r["event"] == "checkpoint" for r in after[newest:])  # the last checkpoint covers every request
    final = run_cli(None, "audit", "verify", str(audit), "--public-key", str(public))
    assert final.returncode == 0 and f"proven: records 1..{newest} " in final.stdout, final.stdout


def test_an_agent_started_on_a_torn_tail_repairs_it_before_appending(token_env: TokenEnv, start_agent: Any) -> None:
    agent: AgentProcess = start_agent(token_env)
    for _ in range(3):
        assert agent.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256"))}).status_code == 200
    agent.stop()
    good = token_env.audit_file.read_bytes()
    with open(token_env.audit_file, "ab") as f:  # what a power cut in the middle of a write leaves
        f.write(b'{"seq":4,"time":"2026-12-02T08:00:00.000Z","event":"sign","caller":{"uid":0')
    again: AgentProcess = start_agent(token_env)
    assert again.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256"))}).status_code == 200
    again.stop()
    assert "not a complete record" in again.output()
    data = token_env.audit_file.read_bytes()
    assert data.startswith(good)
    records = records_of(token_env.audit_file)
    assert [r["event"] for r in records] == ["sign", "sign", "sign", "repair", "sign"]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5] and verify(token_env.audit_file).ok


def test_a_reload_keeps_the_audit_log_for_workers_restarted_after_it(
    token_env: TokenEnv, start_agent: Any, tmp_path: Path
) -> None:
    """``[audit]`` changed and SIGHUP: the agent says a restart applies it, and a worker that is restarted
    afterwards opens the same chained file as the running one, not the new path (two workers appending to
    two files would split the chain)."""
    import signal

    audit = tmp_path / "audit.jsonl"
    use_audit_file(token_env, audit)
    agent: AgentProcess = start_agent(token_env)
    workers = wait_all_workers(agent, 2)
    moved = tmp_path / "moved.jsonl"
    token_env.config.write_text(token_env.config.read_text().replace(str(audit), str(moved)))
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: agent.output().count("[audit] settings changed") >= 2, 20, "both workers to say so")
    wait_until(lambda: agent.output().count("reloaded") >= 2, 20, "the reload")
    os.kill(min(workers), signal.SIGKILL)
    wait_until(lambda: "restarted (pid" in agent.output(), 30, "the restarted worker")
    wait_all_workers(agent, 2)
    answered = []
    for _ in range(40):
        r = sign_fresh(agent)
        assert r.status_code == 200, r.text
        answered.append(r.json()["credentialAssertion"]["signature"])
    agent.stop()
    assert not moved.exists(), "the restarted worker opened the path the reload did not apply"
    records = records_of(audit)
    assert {r["signature"] for r in records if r.get("signature")} >= set(answered)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert verify(audit).ok
