"""The metrics registry in process: what one worker counts (the endpoint over workers is in
``tests/device/test_metrics.py``)."""

from __future__ import annotations

from agent.core.metrics import Metrics
from agent.core.records import Outcome
from agent.dev.testing import samples_of, total


def test_sign_outcomes_count_per_label_set_in_process() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.sign_outcome("a", "p256", Outcome.OK, 0.003)
    metrics.sign_outcome("a", "p256", Outcome.REFUSED, None)
    metrics.sign_outcome("b", "ed25519", Outcome.OK, 0.0004)
    samples = samples_of(metrics.render()[0].decode())
    assert total(samples, "dfns_agent_signatures_total", credential="a", outcome="ok") == 3
    assert total(samples, "dfns_agent_signatures_total", credential="a", outcome="refused") == 1
    assert total(samples, "dfns_agent_signatures_total", credential="b", key_type="ed25519", outcome="ok") == 1
    assert total(samples, "dfns_agent_sign_duration_seconds_count", key_type="p256") == 3
    assert total(samples, "dfns_agent_sign_duration_seconds_bucket", key_type="p256", le="0.002") == 0
    assert total(samples, "dfns_agent_sign_duration_seconds_bucket", key_type="p256", le="0.005") == 3
    assert total(samples, "dfns_agent_sign_duration_seconds_count", key_type="ed25519") == 1
