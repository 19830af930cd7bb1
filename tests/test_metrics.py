"""GET /v1/metrics: Prometheus text, summed over every worker process."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
from conftest import AgentProcess, TokenEnv, cred_id_for, make_challenge
from prometheus_client.parser import text_string_to_metric_families

from agent.core.metrics import Metrics

RULE = '[policy]\n[[policy.rule]]\nname = "root-ed-only"\nuids = [0]\ncredentials = ["ed25519"]\n'


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    """Prometheus text format -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(agent: AgentProcess) -> Samples:
    r = agent.http.get("/v1/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return samples_of(r.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


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


def test_sign_outcomes_count_per_label_set_in_process() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.sign_outcome("a", "p256", "ok", 0.003)
    metrics.sign_outcome("a", "p256", "refused", None)
    metrics.sign_outcome("b", "ed25519", "ok", 0.0004)
    samples = samples_of(metrics.render()[0].decode())
    assert total(samples, "dfns_agent_signatures_total", credential="a", outcome="ok") == 3
    assert total(samples, "dfns_agent_signatures_total", credential="a", outcome="refused") == 1
    assert total(samples, "dfns_agent_signatures_total", credential="b", key_type="ed25519", outcome="ok") == 1
    assert total(samples, "dfns_agent_sign_duration_seconds_count", key_type="p256") == 3
    assert total(samples, "dfns_agent_sign_duration_seconds_bucket", key_type="p256", le="0.002") == 0
    assert total(samples, "dfns_agent_sign_duration_seconds_bucket", key_type="p256", le="0.005") == 3
    assert total(samples, "dfns_agent_sign_duration_seconds_count", key_type="ed25519") == 1
