"""Prometheus metrics (``GET /v1/metrics``), correct when several worker processes serve.

prometheus-client's multiprocess mode keeps each process's values in memory-mapped files under
``PROMETHEUS_MULTIPROC_DIR`` and sums them at scrape time, so whichever worker answers the scrape reports
the whole agent. The directory must be set before prometheus_client is first imported, which is why this
module imports it lazily and :func:`prepare` runs in the supervisor before any worker starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agent.core.records import Outcome
from agent.health import TokenState
from agent.token.recovery import TokenEvent

ENV = "PROMETHEUS_MULTIPROC_DIR"

# The credential (and key_type) label of a signing attempt that names no configured credential: none was
# named and none of the agent's was allowed, or the name is not configured. Fixed, so that the names callers
# send never become series of their own.
NO_CREDENTIAL = ""


def prepare() -> Path:
    """A private, empty directory for this agent run's metric files; set in the environment for workers."""
    directory = Path(tempfile.mkdtemp(prefix="dfns-agent-metrics-"))
    os.environ[ENV] = str(directory)
    return directory


def cleanup(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: they are part of the agent's history)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Metrics:
    """The agent's metrics; one instance per worker process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.signatures = Counter(
            "dfns_agent_signatures",
            "Signing attempts that reached credential selection, by credential (empty when the request named "
            "none or an unknown one), key type and outcome (ok, refused, error).",
            ["credential", "key_type", "outcome"],
            registry=None,
        )
        self.latency = Histogram(
            "dfns_agent_sign_duration_seconds",
            "Time from request to audited signature, successful signatures only.",
            ["key_type"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=None,
        )
        self.refusals = Counter(
            "dfns_agent_refusals", "Requests the policy refused, by rule and code.", ["rule", "code"], registry=None
        )
        self.reconnects = Counter(
            "dfns_agent_token_reconnects", "Successful reconnects to the token after a fault.", registry=None
        )
        self.token_state = Gauge(
            "dfns_agent_token_state",
            "Worker processes whose token is in each state (ok, degraded, down).",
            ["state"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.requests = Counter(
            "dfns_agent_http_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=None
        )
        # labels() costs about as much as the increment (str() of each value, a lock, a lookup); a child
        # stays valid while nothing removes its label set (nothing does), so the hot paths keep them here.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._state: TokenState | None = None
        self.set_token_state(TokenState.OK)

    def set_token_state(self, state: TokenState) -> None:
        if state is self._state:
            return
        for name in TokenState:
            self.token_state.labels(name.value).set(1 if name is state else 0)
        self._state = state

    def token_event(self, event: TokenEvent, state: TokenState) -> None:
        """Hook for the token's circuit (``agent/token/recovery.py``): its state changed, or it reconnected."""
        if event is TokenEvent.RECONNECTED:
            self.reconnects.inc()
        self.set_token_state(state)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def sign_outcome(self, credential: str, key_type: str, outcome: Outcome, seconds: float | None) -> None:
        self._child(self.signatures, credential, key_type, outcome.value).inc()
        if seconds is not None:
            self._child(self.latency, key_type).observe(seconds)

    def request(self, endpoint: str, status: int) -> None:
        self._child(self.requests, endpoint, str(status)).inc()

    def refusal(self, rule: str, code: str) -> None:
        self._child(self.refusals, rule, code).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every worker's values (or this process's, outside multiprocess mode)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        registry: Any = CollectorRegistry()
        if os.environ.get(ENV):
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            for metric in (
                self.signatures,
                self.latency,
                self.refusals,
                self.reconnects,
                self.token_state,
                self.requests,
            ):
                registry.register(metric)
        return generate_latest(registry), CONTENT_TYPE_LATEST
