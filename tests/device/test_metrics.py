"""GET /v1/metrics: Prometheus text, summed over every worker process."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import httpx

from agent.dev.testing import (
    AgentProcess,
    Samples,
    TokenEnv,
    b64url,
    cred_id_for,
    make_challenge,
    samples_of,
    total,
    wait_all_workers,
    wait_until,
)

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
    wait_all_workers(agent, 2)  # the token-state gauge below counts both; health answered with the first
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
    pids = wait_all_workers(agent, 2)
    for _ in range(10):
        assert fresh_post(agent, {"challenge": make_challenge(cred_id_for("p256"))}).status_code == 200
    os.kill(min(pids), signal.SIGKILL)
    # Its replacement has set its gauge once the supervisor says it restarted it (it reported ready).
    wait_until(lambda: "restarted (pid" in agent.output(), 20, "the replacement worker")
    samples = scrape(agent)
    assert total(samples, "dfns_agent_token_state", state="ok") == 2  # the dead worker no longer counts
    assert total(samples, "dfns_agent_signatures_total", outcome="ok") == 10  # its signatures still do


def test_refusals_at_credential_selection_are_counted_under_one_label(token_env: TokenEnv, start_agent: Any) -> None:
    """credential_not_allowed for a request that names no credential is a refusal like any other (it was
    neither counted nor audited); names that are not configured add no series of their own."""
    agent: AgentProcess = start_agent(token_env)
    for _ in range(5):
        r = agent.post("/v1/sign", {"challenge": make_challenge(b64url(b"someone-else"))})
        assert r.status_code == 422 and r.json()["error"]["code"] == "credential_not_allowed"
    for name in ("nope-1", "nope-2"):
        assert agent.post("/v1/sign", {"challenge": make_challenge(), "credential": name}).status_code == 404
    assert agent.post("/v1/sign", {"challenge": make_challenge(cred_id_for("p256"))}).status_code == 200
    samples = scrape(agent)
    assert total(samples, "dfns_agent_signatures_total", outcome="ok") == 1
    assert total(samples, "dfns_agent_signatures_total", outcome="refused") == 7
    assert total(samples, "dfns_agent_signatures_total", credential="", key_type="", outcome="refused") == 7
    labelled = {dict(labels)["credential"] for (name, labels) in samples if name == "dfns_agent_signatures_total"}
    assert labelled == {"", "p256"}
    codes = [json.loads(line).get("code") for line in token_env.audit_file.read_text().splitlines()]
    assert codes == ["credential_not_allowed"] * 5 + ["unknown_credential"] * 2 + [None]
