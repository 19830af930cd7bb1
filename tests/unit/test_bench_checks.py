"""The benchmark's figures and verdicts where they were wrong: percentiles by nearest rank, errors that were
left out of the counts (the whole-flow driver, the ceiling cell, a reference that failed requests), and the
slow-HSM bound with fewer clients than sessions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from bench import flow, report
from bench.loadgen import percentile_ms
from tests.unit.test_bench_report import cell, run_result


def _run() -> report.RunResult:
    return run_result(agent16=3100, ssh16=1000, agent_p50=0.9, ssh_p50=1.0, ed16=2300, ed_limit2=4400)


def _check(run: report.RunResult, start: str) -> report.Check:
    return next(c for c in report.checks(run) if c.name.startswith(start))


# ------------------------------------------------------------------------------------------------------
# Percentiles


def test_percentiles_are_nearest_rank_for_every_sample_count() -> None:
    ms = [i / 1000 for i in range(1, 201)]
    assert percentile_ms(ms[:100], 99) == 99.0  # rank ceil(0.99 * 100) = 99, not the maximum
    assert percentile_ms(ms[:200], 99) == 198.0
    assert percentile_ms(ms[:6], 50) == 3.0  # rank 3 of 6, as for 4 samples (rank 2 of 4)
    assert percentile_ms(ms[:4], 50) == 2.0
    assert percentile_ms(ms[:2], 50) == 1.0
    assert percentile_ms(ms[:5], 50) == 3.0
    assert percentile_ms(ms[:1], 99) == 1.0 and percentile_ms(ms[:3], 100) == 3.0 and percentile_ms([], 50) is None


# ------------------------------------------------------------------------------------------------------
# python -m bench: errors that must change a verdict


def test_an_erring_ssh_agent_gives_no_verdict_instead_of_a_pass() -> None:
    # ssh-agent failing 9 requests in 10: its rate counts only the answered ones, so the ratio looks like 10x.
    run = _run()
    p256 = next(a for a in run.algos if a.kind == "p256")
    p256.rows[1].ssh = cell(300, 9.0, errors=2700)
    check = _check(run, "P-256 @16 clients, agent >=")
    assert check.ok is None and "ssh-agent failed 2700 request(s)" in check.detail
    p256.rows[0].ssh = cell(1000, 1.0, clients=1, errors=5)
    assert _check(run, "P-256 @1 client, agent p50").ok is None
    run.slow = report.SlowResult(2.0, 16, "workers=2, sign_threads=8", cell(3000, 20.0, clients=64, server_us=300),
                                 cell(100, 140.0, clients=64, errors=40))  # fmt: skip
    slow_ssh = next(c for c in report.checks(run) if "slow HSM" in c.name and c.name.endswith("ssh-agent"))
    assert slow_ssh.ok is None and "ssh-agent failed 40" in slow_ssh.detail


def test_a_clean_ssh_agent_still_gets_a_verdict_either_way() -> None:
    run = _run()
    assert _check(run, "P-256 @16 clients, agent >=").ok is True
    p256 = next(a for a in run.algos if a.kind == "p256")
    p256.rows[1].ssh = cell(2000, 9.0)
    assert _check(run, "P-256 @16 clients, agent >=").ok is False


def test_errors_in_the_ceiling_cell_fail_the_zero_error_target() -> None:
    run = _run()
    assert _check(run, "agent: zero errors").ok is True
    run.ceiling = cell(20000, 0.5, errors=500)
    check = _check(run, "agent: zero errors")
    assert check.ok is False and "500 of the errors in the ceiling cell" in check.detail


def test_slow_hsm_bound_counts_at_most_one_signature_in_flight_per_client() -> None:
    # 8 clients, 16 sessions, 2 ms: at most 8 signatures at a time = 4,000/s (not 16 / 2 ms = 8,000/s).
    run = _run()
    run.slow = report.SlowResult(2.0, 16, "workers=2, sign_threads=8", cell(3900, 2.05, clients=8, server_us=100),
                                 cell(450, 17.0, clients=8))  # fmt: skip
    check = next(c for c in report.checks(run) if "concurrency limit" in c.name)
    assert check.ok is True and "3,900/s vs 4,000/s" in check.detail and "8 clients (of 16 sessions)" in check.detail
    # With more clients than sessions the sessions bound it, as before.
    run.slow.agent = cell(3900, 2.05, clients=64, server_us=100)
    check = next(c for c in report.checks(run) if "concurrency limit" in c.name)
    assert check.ok is False and "vs 8,000/s = min(16 sessions / 2 ms" in check.detail


# ------------------------------------------------------------------------------------------------------
# python -m bench.flow: every failed flow counts


def test_flow_errors_in_the_warm_up_are_counted() -> None:
    began = time.monotonic()

    def make() -> tuple[flow.Call, Callable[[], None]]:
        def call() -> None:
            time.sleep(0.005)
            if time.monotonic() - began < 0.2:  # inside the 0.3 s warm-up only
                raise RuntimeError("agent down")

        return call, lambda: None

    c = flow.drive(make, 2, 0.3, 0.3, {})
    assert c.errors > 0 and c.error_examples[0] == "RuntimeError: agent down"
    assert c.latencies  # the window itself was clean


def test_a_client_that_cannot_be_made_is_an_error_not_a_hang() -> None:
    def make() -> tuple[flow.Call, Callable[[], None]]:
        raise ConnectionError("no agent socket")

    result: list[flow.FlowCell] = []
    t = threading.Thread(target=lambda: result.append(flow.drive(make, 2, 0.1, 0.0, {})), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "drive() hung when make() raised"
    assert result[0].errors == 2 and "no agent socket" in result[0].error_examples[0]


def test_a_flow_still_running_after_the_window_is_an_error() -> None:
    release = threading.Event()

    def make() -> tuple[flow.Call, Callable[[], None]]:
        began = time.monotonic()

        def call() -> None:
            if time.monotonic() - began > 0.1:
                release.wait(10)  # hangs past the window and the straggler allowance
            time.sleep(0.005)

        return call, lambda: None

    try:
        c = flow.drive(make, 2, 0.2, 0.0, {}, straggler_seconds=0.3)
    finally:
        release.set()
    assert c.errors == 2 and "still running" in c.error_examples[0]


def test_http_layer_verdict_is_na_when_a_server_failed_requests() -> None:
    from bench.http_layer import verdict_line
    from bench.loadgen import CellResult

    def cell(rate: int, errors: int) -> CellResult:
        return CellResult(
            clients=16, duration=1.0, completed=rate, latencies=[0.001] * rate, errors=errors, error_examples=[],
            verified=0, bad_signatures=0, cpu=0.0, reused=0, answered=rate, server_cpu=rate * 20e-6,
        )  # fmt: skip

    assert verdict_line(16, [cell(1000, 0)], [cell(950, 0)]).startswith("PASS")
    assert verdict_line(16, [cell(1000, 0)], [cell(800, 0)]).startswith("FAIL")
    # uvicorn failing fast looked as fast as the agent: no verdict either way.
    line = verdict_line(16, [cell(1000, 0)], [cell(1000, 300)])
    assert line.startswith("N/A") and "uvicorn 300" in line
    assert verdict_line(16, [cell(1000, 5)], [cell(100, 0)]).startswith("N/A")
