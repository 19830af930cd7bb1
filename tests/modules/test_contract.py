"""The contract every PKCS#11 module the agent supports must meet, run against each module of
``agent/dev/modules.py``: keys listed with their public keys, serving concurrent signatures that verify
with ``cryptography``, doctor passing, and surviving the backend being killed and restarted."""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import httpx
import pytest

from agent.core.audit import verify
from agent.dev import modules
from agent.dev.testing import (
    AgentProcess,
    Notifications,
    TokenEnv,
    check_assertion,
    child_pids,
    make_challenge,
    run_cli,
    short_tempdir,
    sign_concurrently,
    wait_all_workers,
    wait_until,
)
from tests.modules.conftest import write_module_config

CLIENTS = 8
PER_CLIENT = 25


def _sign_many(
    agent: AgentProcess, kinds: list[str], clients: int, per_client: int
) -> tuple[list[Any], list[str], float]:
    cred_ids = {c["name"]: c["credId"] for c in agent.http.get("/v1/credentials").json()["credentials"]}
    signed = sign_concurrently(agent.socket_path, cred_ids, kinds, clients, per_client)
    return signed.results, signed.failures, signed.elapsed


def _check(agent: AgentProcess, results: list[Any]) -> None:
    creds = {c["name"]: c for c in agent.http.get("/v1/credentials").json()["credentials"]}
    for kind, challenge, first_factor in results:
        check_assertion(first_factor, challenge, creds[kind]["publicKey"], creds[kind]["credId"])


def test_keys_list_and_public(backend: modules.Backend, module_env: TokenEnv) -> None:
    r = run_cli(module_env, "keys", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = {k["label"]: k for k in json.loads(r.stdout)}
    for label, kind in backend.keys.items():
        assert listed[label]["type"] == kind, listed
        assert listed[label]["sensitive"] and not listed[label]["extractable"], listed[label]
        pub = run_cli(module_env, "keys", "public", "--label", label)
        assert pub.returncode == 0 and pub.stdout.startswith("-----BEGIN PUBLIC KEY-----"), pub.stderr


def test_serves_concurrent_signatures_that_verify(
    backend: modules.Backend, module_env: TokenEnv, start_agent: Any
) -> None:
    agent: AgentProcess = start_agent(module_env)
    kinds = sorted(set(backend.keys.values()))
    results, failures, elapsed = _sign_many(agent, kinds, CLIENTS, PER_CLIENT)
    print(
        f"\n{backend.name}: {len(results)} signatures ({', '.join(kinds)}) from {CLIENTS} clients "
        f"in {elapsed:.2f}s = {len(results) / elapsed:.0f}/s"
    )
    assert failures == []
    assert len(results) == CLIENTS * PER_CLIENT
    _check(agent, results)
    assert agent.http.get("/v1/health").json()["status"] == "ok"
    audit = verify(module_env.audit_file)
    assert audit.ok and audit.records == CLIENTS * PER_CLIENT


def test_doctor_passes(backend: modules.Backend, module_env: TokenEnv) -> None:
    r = run_cli(module_env, "doctor")
    lines = r.stdout.splitlines()
    token_lines = [line for line in lines if line[2:].startswith(("module", "token", "pin", "key "))]
    assert len(token_lines) >= 3 + len(backend.keys), r.stdout
    assert all(line.startswith("✓") for line in token_lines), r.stdout


def test_backend_killed_and_restarted(backend: modules.Backend, module_env: TokenEnv, start_agent: Any) -> None:
    if not backend.serves_calls:
        pytest.skip(f"{backend.name} runs inside the agent's process: no backend process that serves its calls")
    module_env.config.write_text(
        module_env.config.read_text().replace("[token.module_env]", "probe_interval = 0.5\n[token.module_env]")
    )
    agent: AgentProcess = start_agent(module_env)
    cred_id = agent.http.get("/v1/credentials").json()["credentials"][0]["credId"]
    kind = agent.http.get("/v1/credentials").json()["credentials"][0]["name"]
    backend.kill()
    try:
        # Some modules (tpm2-pkcs11) answer the probe from their own store: the first signature may be what
        # finds the backend gone. Either way the answer is a clean 503/504 and health stops saying ok.
        def refused() -> bool:
            r = agent.post("/v1/sign", {"challenge": make_challenge(cred_id), "credential": kind})
            assert r.status_code in (200, 503, 504), r.text
            return r.status_code != 200 and r.json()["error"]["code"] in ("token_unavailable", "token_timeout")

        wait_until(refused, 30, "a signature refused while the backend is gone")
        wait_until(lambda: agent.http.get("/v1/health").json()["status"] != "ok", 20, "health not ok")
    finally:
        backend.start()
    try:
        wait_until(lambda: agent.http.get("/v1/health").json()["status"] == "ok", 60, "health ok again")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{agent.output()[-3000:]}") from None
    results, failures, _ = _sign_many(agent, [kind], 2, 5)
    assert failures == [] and len(results) == 10
    _check(agent, results)


def test_a_mechanism_the_module_lacks_is_a_start_up_and_doctor_error(
    backend: modules.Backend, module_env: TokenEnv, start_agent: Any
) -> None:
    """p11-kit 0.24 cannot carry CKM_EDDSA: an Ed25519 credential through it must fail before serving,
    naming the mechanism, not on the first request (and doctor must say the same)."""
    if backend.name != "p11kit":
        pytest.skip(f"{backend.name} offers every mechanism its keys need")
    extra = f'\n[[credential]]\nname = "ed"\nkey = "{modules.UNSIGNABLE_ED25519}"\n'
    module_env.config.write_text(module_env.config.read_text() + extra)
    agent: AgentProcess = start_agent(module_env, wait=False)
    agent.proc.wait(60)
    assert agent.proc.returncode != 0
    assert "offers no CKM_EDDSA for signing: cannot sign with ed25519 keys" in agent.output(), agent.output()
    r = run_cli(module_env, "doctor")
    assert r.returncode == 1
    ed = [line for line in r.stdout.splitlines() if line[2:].startswith("key ed")]
    assert ed and ed[0].startswith("✗") and "CKM_EDDSA" in ed[0], r.stdout


SIGN_TIMEOUT = 2.0


def test_hung_backend_every_request_answered_in_time_and_health_at_once(
    backend: modules.Backend, module_env: TokenEnv, start_agent: Any
) -> None:
    """SIGSTOP the backend for a while under 8 signing clients: every request is answered within the sign
    timeout (+1 s of slack for a busy machine), health within 2 s; after SIGCONT signing resumes."""
    if not backend.serves_calls:
        pytest.skip(f"{backend.name} runs inside the agent's process: no backend process to stop")
    text = module_env.config.read_text()
    module_env.config.write_text(
        text.replace("[token.module_env]", f"probe_interval = 0.5\nsign_timeout = {SIGN_TIMEOUT}\n[token.module_env]")
    )
    agent: AgentProcess = start_agent(module_env)
    creds = agent.http.get("/v1/credentials").json()["credentials"]
    stop = threading.Event()
    hung = threading.Event()
    during: list[tuple[float, int, str]] = []  # (seconds, status, code) of requests that began while hung
    health_times: list[float] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        cred = creds[n % len(creds)]
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://a", timeout=60
        ) as http:
            while not stop.is_set():
                began, in_hang = time.monotonic(), hung.is_set()
                r = http.post(
                    "/v1/sign", json={"challenge": make_challenge(cred["credId"]), "credential": cred["name"]}
                )
                took = time.monotonic() - began
                code = r.json()["error"]["code"] if r.status_code != 200 else ""
                if in_hang:
                    with lock:
                        during.append((took, r.status_code, code))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        backend.pause()
        hung.set()
        hang_started = time.monotonic()
        while time.monotonic() - hang_started < 6.0:
            began = time.monotonic()
            status = agent.http.get("/v1/health", timeout=10).json()["status"]
            health_times.append(time.monotonic() - began)
            time.sleep(0.2)
        assert status != "ok"
    finally:
        hung.clear()
        backend.resume()
        stop.set()
        for t in threads:
            t.join(60)
    wait_until(lambda: agent.http.get("/v1/health").json()["status"] == "ok", 60, "health ok after SIGCONT")
    results, failures, _ = _sign_many(agent, sorted({c["name"] for c in creds}), 2, 5)
    assert failures == [] and len(results) == 10
    _check(agent, results)
    slowest = max(t for t, _, _ in during)
    codes = sorted({f"{s} {c}" for _, s, c in during})
    print(
        f"\n{backend.name} hang drill: {len(during)} requests during a 6 s SIGSTOP, slowest {slowest:.2f}s "
        f"(sign_timeout {SIGN_TIMEOUT:g}s), answers {codes}; {len(health_times)} health checks, slowest "
        f"{max(health_times):.2f}s"
    )
    assert during, "no request was made during the hang"
    assert slowest <= SIGN_TIMEOUT + 1.0, during
    assert {s for _, s, _ in during} <= {200, 503, 504}, codes
    assert max(health_times) < 2.0, health_times


@pytest.mark.parametrize("sign_threads", [8, 0])
def test_a_worker_stuck_in_the_token_is_replaced(
    backend: modules.Backend, module_env: TokenEnv, start_agent: Any, sign_threads: int
) -> None:
    """With several workers the supervisor pings systemd for all of them, so a worker whose token call stays
    stuck past [token] stuck_limit must be replaced: on a signing thread (its loop still runs: it drains and
    exits), and inline (sign_threads = 0: the call blocks the worker's event loop itself, and the supervisor
    kills it when its heartbeat stops). Once the backend answers again, so does the agent."""
    if not backend.serves_calls:
        pytest.skip(f"{backend.name} runs inside the agent's process: no backend process to stop")
    write_module_config(
        module_env,
        backend,
        # No probe within the test: only the worker that takes the signature is stuck, so it is the one that
        # must be replaced (probes stuck in both workers would let the other worker's exit pass for it).
        token_extra="probe_interval = 3600\nsign_timeout = 1\nstuck_limit = 2\n",
        server=f"workers = 2\nsign_threads = {sign_threads}\n",
    )
    agent: AgentProcess = start_agent(module_env)
    first = wait_all_workers(agent, 2)
    cred = agent.http.get("/v1/credentials").json()["credentials"][0]
    backend.pause()
    try:
        body = {"challenge": make_challenge(cred["credId"]), "credential": cred["name"]}
        try:
            r = agent.http.post("/v1/sign", json=body, timeout=30)
        except httpx.TransportError:
            # Inline, the answer cannot come: the worker's loop is inside the module until it is killed.
            assert sign_threads == 0
        else:
            assert r.status_code in (503, 504), r.text  # stuck on a signing thread: answered in time
        wait_until(lambda: child_pids(agent.proc.pid) - first, 30, "a stuck worker replaced")
        # A worker whose loop runs gives up by itself (draining its connections); one whose loop is blocked
        # is killed by the supervisor when its heartbeat stops.
        said = "drains its connections and exits" if sign_threads else "has not beaten for"
        assert said in agent.output()
    finally:
        backend.resume()

    def healthy() -> bool:
        # The client's keep-alive connection may have been held by the replaced worker: it is reset, and the
        # next request connects again (to whichever worker accepts it).
        try:
            return bool(agent.http.get("/v1/health").json()["status"] == "ok")
        except httpx.TransportError:
            return False

    wait_until(healthy, 60, "health ok after SIGCONT")
    results, failures, _ = _sign_many(agent, [cred["name"]], 2, 5)
    assert failures == [] and len(results) == 10
    _check(agent, results)
    replaced = first - child_pids(agent.proc.pid)
    print(f"\n{backend.name} stuck worker: {len(replaced)} of 2 workers replaced, signing resumed")


def test_a_single_process_stuck_in_the_token_stops_its_watchdog_pings(
    backend: modules.Backend, module_env: TokenEnv, start_agent: Any
) -> None:
    """One process pings systemd itself: a token call stuck past [token] stuck_limit must stop its
    WATCHDOG=1 pings (systemd then restarts it), and they come back once the call returns."""
    if not backend.serves_calls:
        pytest.skip(f"{backend.name} runs inside the agent's process: no backend process to stop")
    write_module_config(
        module_env,
        backend,
        token_extra="probe_interval = 0.5\nsign_timeout = 1\nstuck_limit = 2\n",
        server="workers = 1\n",
    )
    with short_tempdir() as d:
        notify = Notifications(str(d / "notify"))
        try:
            # WATCHDOG_USEC 1 s: a ping every 0.5 s (no WATCHDOG_PID: the agent's pid is not known before it starts).
            env = {"NOTIFY_SOCKET": str(d / "notify"), "WATCHDOG_USEC": "1000000"}
            agent: AgentProcess = start_agent(module_env, env=env)
            notify.wait_for("WATCHDOG=1", agent.proc, timeout=5)
            cred = agent.http.get("/v1/credentials").json()["credentials"][0]
            backend.pause()
            try:
                r = agent.http.post(
                    "/v1/sign", json={"challenge": make_challenge(cred["credId"]), "credential": cred["name"]}
                )
                assert r.status_code in (503, 504), r.text  # stuck in the module, answered in time
                wait_until(lambda: "no more watchdog pings" in agent.output(), 30, "the watchdog stop logged")
                # The pings stop: none for four ping intervals after the stop was logged (the one in flight
                # when it was decided may still arrive first).
                while notify.receive(0.1) is not None:
                    pass
                quiet_from = len(notify.seen)
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    notify.receive(0.2)
                late = [lines for _, lines in notify.seen[quiet_from:] if "WATCHDOG=1" in lines]
                assert late == [], f"pings went on while the token call was stuck: {late}"
                assert agent.proc.poll() is None  # the process itself stays: systemd's watchdog decides
            finally:
                backend.resume()
            # The stuck call returns once the backend answers: the pings resume, and so does signing.
            notify.wait_for("WATCHDOG=1", agent.proc, timeout=30)
            wait_until(lambda: agent.http.get("/v1/health").json()["status"] == "ok", 60, "health ok after SIGCONT")
            results, failures, _ = _sign_many(agent, [cred["name"]], 2, 5)
            assert failures == [] and len(results) == 10
            _check(agent, results)
        finally:
            notify.close()


def test_keys_generated_on_the_module(backend: modules.Backend, module_env: TokenEnv) -> None:
    """``keys generate`` for every kind the module signs: sign-only keys, or (tpm2-pkcs11, which refuses the
    sign-only template) the module's own usages, as its documented [token] settings ask."""
    listed: dict[str, Any] = {}
    for kind in sorted(set(backend.keys.values())):
        label = f"gen-{kind}-{secrets.token_hex(3)}"
        r = run_cli(module_env, "keys", "generate", "--type", kind, "--label", label)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("-----BEGIN PUBLIC KEY-----") or "BEGIN PUBLIC KEY" in r.stdout, r.stdout
        out = run_cli(module_env, "keys", "list", "--json")
        listed = {k["label"]: k for k in json.loads(out.stdout)}
        key = listed[label]
        assert key["type"] == kind and key["sensitive"] and not key["extractable"], key
        if "keygen_template" not in backend.token_extra:
            assert key["otherUsages"] == [], key
