"""GET /v1/metrics: Prometheus text, summed over every worker process."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx

from agent.dev.testing import AgentProcess, Samples, TokenEnv, cred_id_for, make_challenge, samples_of, total

RULE = '[policy]\n[[policy.rule]]\nname = "root-ed-only"\nuids = [0]\ncredentials = ["ed25519"]\n'


def scrape(agent: AgentProcess) -> Samples:
    r = agent.http.get("/v1/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return samples_of(r.text)


def fresh_post(agent: AgentProcess, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://a") as http:
        return http.post("/v1/sign", json=body)


def test_metrics_sum_over_workers(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(server="workers = 2\nsign_threads = 0\n", extra_top=RULE if os.geteuid() == 0 else "")
    agent: AgentProcess = start_agent(token_env)
    for _ in range(40):  # fresh connections spread over both workers
        assert fresh_post(agent, {"challenge": make_challenge(cred_id_for("ed25519"))}).status_code == 200
    for _ in range(3):
        assert fresh_post(agent, {"challenge": make_challenge("nope"), "credential": "ed25519"}).status_code == 422
    samples = scrape(agent)
    assert total(samples, "dfns_agent_signatures_total", credential="ed25519", key_type="ed25519", outcome="ok") == 40
    assert total(samples, "dfns_agent_signatures_total", outcome="refused") == 3
    assert total(samples, "dfns_agent_sign_duration_seconds_count", key_type="ed25519") == 40
    assert total(samples, "dfns_agent_token_state", state="ok") == 2  # two live workers, both ok
    assert total(samples, "dfns_agent_token_state", state="degraded") == 0
    assert total(samples, "dfns_agent_http_requests_total", endpoint="/v1/sign", status="200") == 40
    if os.geteuid() == 0:
        r = fresh_post(agent, {"challenge": make_challenge(cred_id_for("p256")), "credential": "p256"})
        assert r.status_code == 403
        samples = scrape(agent)
        assert total(samples, "dfns_agent_refusals_total", rule="root-ed-only", code="forbidden") == 1


def test_a_dead_workers_gauge_is_dropped_and_its_counts_kept(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(server="workers = 2\nsign_threads = 0\n")
    agent: AgentProcess = start_agent(token_env)
    for _ in range(10):
        assert fresh_post(agent, {"challenge": make_challenge(cred_id_for("p256"))}).status_code == 200
    import subprocess

    pids = [
        int(p)
        for p in subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(agent.proc.pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "restarting it" not in agent.output():
        time.sleep(0.05)
    time.sleep(0.5)
    samples = scrape(agent)
    assert total(samples, "dfns_agent_token_state", state="ok") == 2  # the dead worker no longer counts
    assert total(samples, "dfns_agent_signatures_total", outcome="ok") == 10  # its signatures still do
