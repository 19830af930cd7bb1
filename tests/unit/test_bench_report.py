"""The benchmark (``python -m bench``): its verdict logic on known figures, and one short real run.

No speed is asserted here: the targets are the benchmark's to print. These tests check that it measures
what it says (every contender answers, signatures verify, rounds are pooled as documented) and that each
PASS/FAIL line can go either way.
"""

from __future__ import annotations

import pytest

from bench import report
from bench.limit import LimitResult
from bench.loadgen import CellResult


def cell(rate: float, p50_ms: float, *, clients: int = 16, errors: int = 0, server_us: float = 500.0) -> CellResult:
    """A one-second cell answering ``rate`` requests, all at ``p50_ms`` except the slowest 1%, at twice it."""
    n = int(rate)
    slow = max(1, n // 100)
    latencies = [p50_ms / 1000] * (n - slow) + [2 * p50_ms / 1000] * slow
    return CellResult(
        clients=clients, duration=1.0, completed=n, latencies=latencies, errors=errors, error_examples=[],
        verified=10, bad_signatures=0, cpu=n * 40e-6, reused=0, answered=n, server_cpu=n * server_us * 1e-6,
    )  # fmt: skip


def limit_result(processes: int, rate: float, cpu_us: float = 200.0) -> LimitResult:
    n = int(rate)
    return LimitResult(processes, rate, 80, 0, 0.0, signatures=n, cpu=n * cpu_us * 1e-6)


def run_result(*, agent16: float, ssh16: float, agent_p50: float, ssh_p50: float, ed16: float, ed_limit2: float,
               workers: int = 2) -> report.RunResult:  # fmt: skip
    p256 = report.AlgoResult("p256", limit_1=limit_result(1, 6000), limit_n=limit_result(2, 12000))
    p256.rows = [
        report.Row(1, cell(1000, agent_p50, clients=1), cell(1000, ssh_p50, clients=1)),
        report.Row(16, cell(agent16, 5.0), cell(ssh16, 9.0)),
    ]
    ed = report.AlgoResult("ed25519", limit_1=limit_result(1, 3000, 330), limit_n=limit_result(2, ed_limit2, 440))
    ed.rows = [report.Row(16, cell(ed16, 8.0))]
    return report.RunResult(
        workers=workers, loadgen_procs=2, rounds=1, duration=1.0, message_bytes=80, algos=[ed, p256],
        ceiling=cell(20000, 0.5), rss_kib={1: 50 * 1024}, agent_pid=1, cores=2, fsync_ms=0.2,
    )  # fmt: skip


def verdicts(run: report.RunResult) -> dict[str, bool | None]:
    """Each check's verdict by the start of its name (up to the target's figure)."""
    return {c.name.split(" >= ")[0].split(" <= ")[0]: c.ok for c in report.checks(run)}


def test_each_target_can_pass_and_fail() -> None:
    good = verdicts(run_result(agent16=3100, ssh16=1000, agent_p50=0.9, ssh_p50=1.0, ed16=2300, ed_limit2=4400))
    bad = verdicts(run_result(agent16=2900, ssh16=1000, agent_p50=1.1, ssh_p50=1.0, ed16=2100, ed_limit2=4400))
    for name in ("P-256 @16 clients, agent", "P-256 @1 client, agent p50", "Ed25519 @16 clients, agent"):
        assert good[name] is True, name
        assert bad[name] is False, name
    assert good["agent: zero errors"] is True and good["agent peak RSS < 80 MB per process"] is True
    # Rows not measured (no 64-client row here) are N/A, not a pass.
    assert good["ECDSA P-256 @64 clients, agent p99"] is None
    assert good["P-256 @64 clients, agent"] is None


def test_cpu_beyond_the_sign_target_subtracts_the_in_process_sign() -> None:
    # 2 workers: the 2-process P-256 limit costs 200 us per signature; 340 us measured -> 140 beyond it.
    run = run_result(agent16=3100, ssh16=1000, agent_p50=0.9, ssh_p50=1.0, ed16=2300, ed_limit2=4400)
    p256 = next(a for a in run.algos if a.kind == "p256")
    p256.rows[1] = report.Row(16, cell(3100, 5.0, server_us=340), cell(1000, 9.0))
    check = next(c for c in report.checks(run) if "beyond the sign" in c.name)
    assert check.ok is True and check.detail.startswith("140 us")
    p256.rows[1] = report.Row(16, cell(3100, 5.0, server_us=360), cell(1000, 9.0))
    assert next(c for c in report.checks(run) if "beyond the sign" in c.name).ok is False


def test_slow_hsm_targets_take_the_lower_of_the_session_and_cpu_bounds() -> None:
    run = run_result(agent16=3100, ssh16=1000, agent_p50=0.9, ssh_p50=1.0, ed16=2300, ed_limit2=4400)
    # 8 sessions at 2 ms = 4,000/s; 2 cores at 400 us (agent) + 40 us (load generator) per request = 4,545/s
    # -> the bound is 4,000/s.
    run.slow = report.SlowResult(2.0, 8, "workers=2, sign_threads=4", cell(3300, 19.0, clients=64, server_us=400),
                                 cell(450, 140.0, clients=64))  # fmt: skip
    by = {c.name: c for c in report.checks(run)}
    limit = next(c for n, c in by.items() if "concurrency limit" in n)
    assert limit.ok is True and "3,300/s vs 4,000/s" in limit.detail
    assert next(c for n, c in by.items() if n.endswith("ssh-agent") and "slow" in n).ok is True  # 7.3x
    # CPU-bound: 2 cores at 800 + 40 us per request = 2,381/s (the load generator shares the cores); 1,900/s is
    # 0.798x of it, and 0.76x of the 2,500/s the agent's CPU alone would allow.
    run.slow.agent = cell(1900, 30.0, clients=64, server_us=800)
    by = {c.name: c for c in report.checks(run)}
    limit = next(c for n, c in by.items() if "concurrency limit" in n)
    assert limit.ok is False and "1,900/s vs 2,381/s" in limit.detail and "40 us load generator" in limit.detail
    assert next(c for n, c in by.items() if n.endswith("ssh-agent") and "slow" in n).ok is True  # 4.2x
    assert "slow HSM (2 ms per signature" in report.render(run)


def test_audit_bytes_are_printed_per_signature() -> None:
    run = run_result(agent16=3100, ssh16=1000, agent_p50=0.9, ssh_p50=1.0, ed16=2300, ed_limit2=4400)
    run.audit_bytes = run.agent_signatures() * 1300
    assert "about 1,300 bytes per signature answered" in report.render(run)


def test_ed25519_target_uses_the_limit_with_the_agents_process_count() -> None:
    # One worker: compared with the 1-process limit (3,000/s), not the 2-process one.
    run = run_result(agent16=1, ssh16=1, agent_p50=1, ssh_p50=1, ed16=1900, ed_limit2=4400, workers=1)
    check = next(c for c in report.checks(run) if c.name.startswith("Ed25519 @16"))
    assert check.ok is True and "1,900/s vs 3,000/s" in check.detail


def test_errors_in_any_row_fail_the_zero_error_target() -> None:
    run = run_result(agent16=3100, ssh16=1000, agent_p50=0.5, ssh_p50=1.0, ed16=2700, ed_limit2=4400)
    run.algos[0].rows[0] = report.Row(16, cell(2700, 8.0, errors=1))
    assert verdicts(run)["agent: zero errors"] is False


def test_pooled_cell_takes_the_median_rate_and_keeps_every_latency_and_error() -> None:
    rounds = [cell(1000, 1.0, errors=1), cell(100, 9.0), cell(1100, 1.0)]
    pooled = CellResult.pooled(rounds)
    assert pooled.rate == 1000  # the slow round does not drag the figure down; a mean would be 733
    assert pooled.completed == 2200 and pooled.total_errors == 1 and pooled.verified == 30
    assert len(pooled.latencies) == 2200 and pooled.p99 == 9.0  # the slow round's latencies all count
    assert pooled.server_cpu_per_request_us == pytest.approx(500.0)
    lim = LimitResult.pooled([limit_result(2, 9000), limit_result(2, 4000), limit_result(2, 10000)])
    assert lim.rate == 9000 and lim.processes == 2 and lim.cpu_per_signature_us == pytest.approx(200.0)


def test_per_round_ratios_are_printed_next_to_the_verdict() -> None:
    run = run_result(agent16=1, ssh16=1, agent_p50=0.5, ssh_p50=1.0, ed16=2700, ed_limit2=4400)
    p256 = next(a for a in run.algos if a.kind == "p256")
    row = p256.rows[1]
    row.agent = CellResult.pooled([cell(2000, 5.0), cell(3000, 5.0)])
    row.ssh = CellResult.pooled([cell(1000, 9.0), cell(1000, 9.0)])
    check = next(c for c in report.checks(run) if c.name.startswith("P-256 @16"))
    assert "per round 2.00x, 3.00x" in check.detail


def test_budget_shows_what_a_target_leaves_the_agent() -> None:
    # 3x of 1,000/s = 3,000/s on 2 cores = 667 us per request; sign 200 (limit), load generator 40 -> 427 left.
    run = run_result(agent16=2000, ssh16=1000, agent_p50=0.5, ssh_p50=1.0, ed16=2700, ed_limit2=4400)
    lines = report.budgets(run)
    p256 = next(line for line in lines if line.startswith("P-256"))
    assert "3,000 sig/s" in p256 and "get 667 us" in p256 and "leaves 427 us" in p256
    assert "agent spent 300 us on top of the sign" in p256  # 500 us measured - 200 us signing
    assert "CPU budget per request" in report.render(run)


def test_budget_of_a_single_worker_counts_one_core_and_its_own_limit() -> None:
    # 1 worker: 0.5 x the 1-process Ed25519 limit (3,000/s) = 1,500/s on 1 core = 667 us per request;
    # the 1-process limit's sign costs 330 us and the load generator runs on the other core -> 337 left.
    run = run_result(agent16=1, ssh16=1, agent_p50=1, ssh_p50=1, ed16=1900, ed_limit2=4400, workers=1)
    ed = next(line for line in report.budgets(run) if line.startswith("Ed25519"))
    assert "1,500 sig/s" in ed and "1 of 2 cores: 667 us" in ed and "leaves 337 us" in ed
    assert "load generator" not in ed


def test_flow_verdicts_can_pass_and_fail() -> None:
    from bench import flow

    def pooled(clients: int, rate: float, p50_ms: float, errors: int = 0) -> flow.Pooled:
        n = int(rate)
        return flow.Pooled([flow.FlowCell(clients, 1.0, [p50_ms / 1000] * n, errors)])

    def run(agent_p50: float, agent_rate: float) -> dict[str, bool | None]:
        r = flow.FlowRun(20.0, 1.0, 1, sdk={1: pooled(1, 14, 62.0), 256: pooled(256, 1000, 250.0)},
                         agent={1: pooled(1, 14, agent_p50), 256: pooled(256, agent_rate, 250.0)},
                         agent_rss_kib={1: 60 * 1024}, cores=2)  # fmt: skip
        return {v.name.split(",")[0]: v.ok for v in flow.verdicts(r)}

    good, bad = run(62.9, 910), run(63.1, 890)
    assert good["flow @1 client"] is True and bad["flow @1 client"] is False
    assert good["flow @256 clients"] is True and bad["flow @256 clients"] is False
    assert good["flow: agent zero errors"] is True and good["flow: agent peak RSS < 80 MB per process"] is True
