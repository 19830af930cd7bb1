"""The printed report: one table per algorithm, the sanity lines, and a PASS/FAIL line per issue target.

Targets are printed, never asserted: this is a benchmark, and a miss is a result to read, not a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.limit import LimitResult
from bench.loadgen import CellResult

NAMES = {"ed25519": "Ed25519", "p256": "ECDSA P-256"}
MIB = 1024.0


@dataclass
class Row:
    clients: int
    agent: CellResult
    ssh: CellResult | None = None


@dataclass
class AlgoResult:
    kind: str
    rows: list[Row] = field(default_factory=list)
    limit_1: LimitResult | None = None
    limit_n: LimitResult | None = None

    def row(self, clients: int) -> Row | None:
        return next((r for r in self.rows if r.clients == clients), None)


@dataclass
class SlowResult:
    """The slow-HSM cells: the same token behind a filter module that holds each signature ``sign_ms``."""

    sign_ms: float
    sessions: int  # the agent's signing sessions: workers x sign_threads (1 per worker signing on its loop)
    settings: str  # the agent's [server] settings, as the report prints them
    agent: CellResult
    ssh: CellResult | None = None


@dataclass
class RunResult:
    workers: int  # what --workers asked the agent for
    loadgen_procs: int
    rounds: int
    duration: float
    message_bytes: int
    algos: list[AlgoResult]
    ceiling: CellResult
    rss_kib: dict[int, int]  # the agent's processes: pid -> VmHWM
    agent_pid: int
    agent_version: str = ""
    cores: int = 0
    busy_before: float = 0.0  # fraction of all cores busy with other work just before / after the run
    busy_after: float = 0.0
    fsync_ms: float = 0.0  # median append+fsync on the token's filesystem
    fsync_cpu_us: float = 0.0  # CPU per append+fsync there
    stolen: float = 0.0  # fraction of the CPUs' time the hypervisor gave to others during the run
    audit_bytes: int = 0  # what the agent wrote under $XDG_STATE_HOME (an audit log, if it keeps one)
    slow: SlowResult | None = None

    def agent_signatures(self) -> int:
        """Signatures the agent answered in the measured cells (the audit log also holds warm-ups)."""
        return sum(r.agent.answered for a in self.algos for r in a.rows)


# ------------------------------------------------------------------------------------------------------
# Formatting helpers


def _n(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _table(algo: AlgoResult, n_procs: int) -> Iterator[str]:
    heads = [
        ("clients", 7), ("agent sig/s", 11), ("p50 ms", 7), ("p99 ms", 7),
        ("ssh sig/s", 9), ("p50 ms", 7), ("p99 ms", 7),
        ("limit 1p/s", 10), (f"limit {n_procs}p/s", 10),
        ("agent/ssh", 9), ("p50 a/ssh", 9), (f"agent/lim{n_procs}p", 12),
        ("agent us/sig", 12), ("ssh us/sig", 10),
    ]  # fmt: skip
    yield "  ".join(h.rjust(w) for h, w in heads)
    yield "  ".join("-" * w for _, w in heads)
    l1 = algo.limit_1.rate if algo.limit_1 else None
    ln = algo.limit_n.rate if algo.limit_n else None
    for row in algo.rows:
        a, s = row.agent, row.ssh
        cells = [
            str(row.clients), _n(a.rate), _n(a.p50, ".2f"), _n(a.p99, ".2f"),
            _n(s.rate) if s else "n/a", _n(s.p50, ".2f") if s else "n/a", _n(s.p99, ".2f") if s else "n/a",
            _n(l1), _n(ln),
            _x(_ratio(a.rate, s.rate)) if s else "n/a", _x(_ratio(a.p50, s.p50)) if s else "n/a",
            _x(_ratio(a.rate, ln)),
            _n(a.server_cpu_per_request_us), _n(s.server_cpu_per_request_us) if s else "n/a",
        ]  # fmt: skip
        yield "  ".join(c.rjust(w) for c, (_, w) in zip(cells, heads, strict=True))


# ------------------------------------------------------------------------------------------------------
# Targets (from the issue)


@dataclass
class Check:
    name: str
    ok: bool | None  # None: could not be evaluated
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[self.ok]
        return f"{verdict}  {self.name}: {self.detail}"


def _per_round(pairs: Iterable[tuple[float | None, float | None]]) -> str:
    """The ratio in each round (both sides measured minutes apart), to show how much a verdict could move."""
    ratios = [_x(_ratio(a, b)) for a, b in pairs]
    return f"; per round {', '.join(ratios)}" if len(ratios) > 1 else ""


def _limit_for_agent(algo: AlgoResult, procs: int) -> LimitResult | None:
    for lim in (algo.limit_1, algo.limit_n):
        if lim is not None and lim.processes == procs:
            return lim
    return None


# The throughput targets against ssh-agent (issue 14): P-256 at 16 and 64 clients.
SSH_TARGETS = ((16, 3.0), (64, 5.0))
P50_TARGET = 1.0  # P-256 @1 client: agent p50 <= this x ssh-agent's
ED_TARGET = 0.5  # Ed25519 @16 clients: agent >= this x the in-process limit with the agent's process count
CPU_TARGET_US = 150.0  # P-256 @16 clients: the agent's CPU per request beyond the token's sign
SLOW_LIMIT_TARGET = 0.8  # slow HSM: agent >= this x min(sessions / latency, what the CPU allows)
SLOW_SSH_TARGET = 4.0  # slow HSM: agent >= this x ssh-agent (whose helper signs serially)


def _reference_failed(reference: CellResult) -> str | None:
    """Why a comparison with ``reference`` (ssh-agent) has no verdict: its rate and latencies count only the
    requests it answered correctly, so a reference that failed requests looks slower (or, failing fast,
    quicker) than it is, and a ratio against it would pass or fail on its failures, not on the agent."""
    errors = reference.total_errors
    return f"no verdict: ssh-agent failed {errors} request(s) in this cell; " if errors else None


def _compared(name: str, ok: bool, reference: CellResult, detail: str) -> Check:
    """A check against ``reference``: ``ok`` as its verdict, or none (said first in the detail) when the
    reference itself failed requests."""
    why = _reference_failed(reference)
    return Check(name, None if why else ok, (why or "") + detail)


def _ssh_check(p256: AlgoResult | None, clients: int, want: float) -> Check:
    name = f"P-256 @{clients} clients, agent >= {want:g}x ssh-agent throughput"
    row = p256.row(clients) if p256 else None
    if not row or not row.ssh:
        return Check(name, None, "not measured")
    r = _ratio(row.agent.rate, row.ssh.rate)
    detail = f"{_x(r)} ({_n(row.agent.rate)}/s vs {_n(row.ssh.rate)}/s)"
    detail += _per_round((a.rate, b.rate) for a, b in zip(row.agent.rounds, row.ssh.rounds, strict=True))
    return _compared(name, r is not None and r >= want, row.ssh, detail)


def cpu_beyond_sign_us(run: RunResult, algo: AlgoResult, clients: int) -> tuple[float, float] | None:
    """(the agent's CPU per request, the token's sign in-process) in us, at ``clients`` clients."""
    row = algo.row(clients)
    signer = _limit_for_agent(algo, run.workers) or algo.limit_n
    if row is None or signer is None or signer.cpu_per_signature_us is None:
        return None
    agent = row.agent.server_cpu_per_request_us
    return None if agent is None else (agent, signer.cpu_per_signature_us)


def slow_checks(slow: SlowResult, cores: int) -> list[Check]:
    # Signatures in flight at once: one per signing session, and never more than the clients, each of which
    # has one request outstanding (a closed loop).
    in_flight = min(slow.sessions, slow.agent.clients) if slow.agent.clients else slow.sessions
    sessions_rate = in_flight * 1000 / slow.sign_ms
    cpu = slow.agent.server_cpu_per_request_us
    # The bound is all of the machine's cores, and the load generator runs on them too: what the CPU allows
    # is the cores over the agent's CPU per request plus the load generator's.
    loadgen = slow.agent.cpu_per_request_us or 0.0
    cpu_rate = cores * 1e6 / (cpu + loadgen) if cpu and cores else None
    bound = min(sessions_rate, cpu_rate) if cpu_rate else sessions_rate
    r = _ratio(slow.agent.rate, bound)
    held = f"{slow.sessions} sessions" if in_flight == slow.sessions else (
        f"{in_flight} clients (of {slow.sessions} sessions)")  # fmt: skip
    detail = (f"{_x(r)} ({_n(slow.agent.rate)}/s vs {_n(bound)}/s = min({held} / "
              f"{slow.sign_ms:g} ms = {_n(sessions_rate)}/s, {cores} cores / ({_n(cpu)} us agent + "
              f"{_n(loadgen)} us load generator CPU per request) = {_n(cpu_rate)}/s); {slow.settings}")  # fmt: skip
    at = f"slow HSM ({slow.sign_ms:g} ms per signature) @{slow.agent.clients} clients"
    ok = r is not None and r >= SLOW_LIMIT_TARGET
    out = [Check(f"{at}, agent >= {SLOW_LIMIT_TARGET:g}x the concurrency limit", ok, detail)]
    name = f"{at}, agent >= {SLOW_SSH_TARGET:g}x ssh-agent"
    if slow.ssh is None:
        out.append(Check(name, None, "not measured"))
    else:
        r = _ratio(slow.agent.rate, slow.ssh.rate)
        out.append(_compared(name, r is not None and r >= SLOW_SSH_TARGET, slow.ssh,
                             f"{_x(r)} ({_n(slow.agent.rate)}/s vs {_n(slow.ssh.rate)}/s)"))  # fmt: skip
    errors = slow.agent.total_errors
    out.append(Check(f"{at}, agent: zero errors", errors == 0, f"{errors} error(s)"))
    return out


def checks(run: RunResult) -> list[Check]:
    out: list[Check] = []
    by = {a.kind: a for a in run.algos}
    p256, ed = by.get("p256"), by.get("ed25519")

    out.extend(_ssh_check(p256, clients, want) for clients, want in SSH_TARGETS)

    name = f"P-256 @1 client, agent p50 <= {P50_TARGET:g}x ssh-agent p50"
    row = p256.row(1) if p256 else None
    if row and row.ssh:
        r = _ratio(row.agent.p50, row.ssh.p50)
        detail = f"{_x(r)} ({_n(row.agent.p50, '.3f')} ms vs {_n(row.ssh.p50, '.3f')} ms)"
        detail += _per_round((a.p50, b.p50) for a, b in zip(row.agent.rounds, row.ssh.rounds, strict=True))
        if p256 is not None and p256.limit_1 and p256.limit_1.rate and run.fsync_ms:
            # What the audit's fsync-before-return leaves for everything else (HTTP, JSON, both processes).
            sign_ms = 1000 / p256.limit_1.rate
            floor = sign_ms + run.fsync_ms
            detail += (f"; token sign {sign_ms:.3f} + append+fsync {run.fsync_ms:.3f} = {floor:.3f} ms alone "
                       f"= {_x(_ratio(floor, row.ssh.p50))}")  # fmt: skip
        out.append(_compared(name, r is not None and r <= P50_TARGET, row.ssh, detail))
    else:
        out.append(Check(name, None, "not measured"))

    row = ed.row(16) if ed else None
    lim = _limit_for_agent(ed, run.workers) if ed else None
    name = (f"Ed25519 @16 clients, agent >= {ED_TARGET:g}x in-process limit with {run.workers} process(es) "
            "(agent's workers)")  # fmt: skip
    if row and lim:
        r = _ratio(row.agent.rate, lim.rate)
        detail = f"{_x(r)} ({_n(row.agent.rate)}/s vs {_n(lim.rate)}/s)"
        detail += _per_round((a.rate, b.rate) for a, b in zip(row.agent.rounds, lim.rounds, strict=True))
        out.append(Check(name, r is not None and r >= ED_TARGET, detail))
    else:
        out.append(Check(name, None, "not measured"))

    name = f"P-256 @16 clients, agent CPU per request beyond the sign <= {CPU_TARGET_US:g} us"
    cpu = cpu_beyond_sign_us(run, p256, 16) if p256 else None
    if cpu is None:
        out.append(Check(name, None, "not measured"))
    else:
        agent, sign = cpu
        detail = f"{agent - sign:,.0f} us ({agent:,.0f} us per request, {sign:,.0f} us the token's sign in-process)"
        http = run.ceiling.server_cpu_per_request_us
        if http is not None:
            # Measured floors: the agent's HTTP path with no signing and no audit (the ceiling cell), and the
            # append+fsync every signature's record needs before its answer leaves.
            floor = http + run.fsync_cpu_us
            detail += (f"; floor in this run: HTTP alone {http:,.0f} us (GET /v1/credentials) + append+fsync "
                       f"{run.fsync_cpu_us:,.0f} us = {floor:,.0f} us")  # fmt: skip
        out.append(Check(name, agent - sign <= CPU_TARGET_US, detail))

    for algo in run.algos:
        row = algo.row(64)
        name = f"{NAMES[algo.kind]} @64 clients, agent p99 <= 4x p50"
        if row and row.agent.p50 and row.agent.p99 is not None:
            r = row.agent.p99 / row.agent.p50
            out.append(Check(name, r <= 4, f"{r:.2f}x (p50 {row.agent.p50:.2f} ms, p99 {row.agent.p99:.2f} ms)"))
        else:
            out.append(Check(name, None, "not measured"))

    # Every cell the agent served counts, the ceiling's GET /v1/credentials included (the slow-HSM cells have
    # their own line).
    signing_errors = sum(r.agent.total_errors for a in run.algos for r in a.rows)
    agent_errors = signing_errors + run.ceiling.total_errors
    agent_bad = sum(r.agent.bad_signatures for a in run.algos for r in a.rows)
    verified = sum(r.agent.verified for a in run.algos for r in a.rows)
    detail = f"{agent_errors} error(s), {agent_bad} bad of {verified + agent_bad} sampled signatures"
    if run.ceiling.total_errors:
        detail += f" ({run.ceiling.total_errors} of the errors in the ceiling cell, GET /v1/credentials)"
    out.append(Check("agent: zero errors", agent_errors == 0, detail))

    if run.rss_kib:
        worst = max(run.rss_kib.values()) / MIB
        out.append(Check("agent peak RSS < 80 MB per process", worst < 80, f"largest {worst:.1f} MiB"))
    else:
        out.append(Check("agent peak RSS < 80 MB per process", None, "could not read /proc"))
    if run.slow is not None:
        out.extend(slow_checks(run.slow, run.cores))
    return out


def budgets(run: RunResult) -> list[str]:
    """For each throughput target: the CPU per request it allows the agent on this machine, what the token's
    signing (and, when they share cores, the load generator) take of that, both measured in this run, and
    what the agent spent on the rest. When the remainder is below the agent's own work, no load reaches it.

    An agent with W workers serves requests on at most min(W, cores) cores; the load generator only competes
    for them when the agent occupies every core."""
    by = {a.kind: a for a in run.algos}
    wanted: list[tuple[str, AlgoResult, Row, float]] = []
    p256, ed = by.get("p256"), by.get("ed25519")
    for clients, want in SSH_TARGETS:
        row = p256.row(clients) if p256 else None
        if p256 and row and row.ssh and row.ssh.rate:
            wanted.append((f"P-256 @{clients} clients at {want:g}x ssh-agent", p256, row, want * row.ssh.rate))
    row = ed.row(16) if ed else None
    lim = _limit_for_agent(ed, run.workers) if ed else None
    if ed and row and lim and lim.rate:
        wanted.append((f"Ed25519 @16 clients at {ED_TARGET:g}x the {lim.processes}-process limit", ed, row,
                       ED_TARGET * lim.rate))  # fmt: skip
    out = []
    cores = min(run.cores, run.workers)
    shared = run.workers >= run.cores
    for what, algo, row, rate in wanted:
        signer = _limit_for_agent(algo, run.workers) or algo.limit_n  # signing with the agent's process count
        sign = signer.cpu_per_signature_us if signer else None
        loadgen = row.agent.cpu_per_request_us if shared else 0.0
        agent = row.agent.server_cpu_per_request_us
        if not cores or sign is None or loadgen is None or agent is None:
            continue
        total = cores * 1e6 / rate
        where = f"{run.workers} worker(s) on {run.cores} cores get {total:,.0f} us of CPU per request"
        if not shared:
            where = f"{run.workers} worker(s) get {cores} of {run.cores} cores: {total:,.0f} us of CPU per request"
        taken = f"the token's sign takes {sign:,.0f} (in-process)"
        if shared:
            taken += f" and the load generator, on the same cores, {loadgen:,.0f}"
        out.append(
            f"{what} = {rate:,.0f} sig/s: the agent's {where}; {taken}, which leaves {total - sign - loadgen:,.0f} "
            f"us for HTTP, JSON, policy, the audit record and its fsync; this run's agent spent {agent - sign:,.0f} "
            "us on top of the sign"
        )
    return out


# ------------------------------------------------------------------------------------------------------
# The whole report


def render(run: RunResult) -> str:
    n_procs = next((a.limit_n.processes for a in run.algos if a.limit_n), max(2, run.workers))
    lines = [
        f"dfns-agent benchmark{(' ' + run.agent_version) if run.agent_version else ''}: SoftHSM token, "
        f"clientData {run.message_bytes} B, {run.duration:g} s per cell, {run.rounds} round(s) interleaved "
        f"(rates: the median round; latencies and errors: all rounds), agent workers={run.workers}, "
        f"load generator {run.loadgen_procs} processes",
        "agent = POST /v1/sign over the Unix socket; ssh = OpenSSH ssh-agent (PKCS#11, same token); "
        f"limit = python-pkcs11 in-process, 1 and {n_procs} processes; us/sig = server CPU (all its processes) per "
        "answered request",
        f"machine: {run.cores} cores; other processes kept {run.busy_before:.0%} of them busy just before the run "
        f"and {run.busy_after:.0%} just after; the hypervisor took {run.stolen:.0%} of their time during the run "
        f"(steal); append+fsync {run.fsync_ms:.2f} ms (median, {run.fsync_cpu_us:,.0f} us CPU) on the token's "
        "filesystem"
        + ("  ** WARNING: a busy machine skews every number; compare ratios, or rerun when idle **"
           if max(run.busy_before, run.busy_after, run.stolen) > 0.1 else ""),
        "",
    ]  # fmt: skip
    for algo in run.algos:
        extra = "" if algo.kind == "p256" else "  (ssh-agent: n/a, OpenSSH 9.2 cannot use Ed25519 keys from PKCS#11)"
        lines.append(f"{NAMES[algo.kind]}{extra}")
        lines.extend(_table(algo, n_procs))
        lines.append("")

    c = run.ceiling
    best = max((r.agent.rate for a in run.algos for r in a.rows), default=0.0)
    cpu = c.cpu_per_request_us
    capacity = run.loadgen_procs * 1e6 / cpu if cpu else None
    lines.append(
        f"loadgen ceiling: GET /v1/credentials (no signing) at {c.clients} clients: {_n(c.rate)} req/s, "
        f"p50 {_n(c.p50, '.2f')} ms; best signing rate above is {_n(best)}/s = {_n(_ratio(best, c.rate), '.0%')} "
        "of it"
    )
    lines.append(
        f"loadgen cost: {_n(cpu, '.1f')} us CPU per request -> {_n(capacity)} req/s with {run.loadgen_procs} "
        "processes at 100% CPU (the ceiling above is the agent's HTTP path, not the load generator)"
    )
    rss = ", ".join(
        f"pid {pid}{' (main)' if pid == run.agent_pid else ''} {kib / MIB:.1f} MiB" for pid, kib in run.rss_kib.items()
    )
    lines.append(f"agent peak RSS (VmHWM) per process: {rss or 'n/a'}")
    if run.audit_bytes:
        signed = run.agent_signatures()
        per = f", about {run.audit_bytes / signed:,.0f} bytes per signature answered" if signed else ""
        lines.append(
            f"agent state written during the run ($XDG_STATE_HOME, e.g. its audit log): {run.audit_bytes:,} bytes{per}"
        )
    if run.slow is not None:
        sl = run.slow
        lines.append(
            f"slow HSM ({sl.sign_ms:g} ms per signature, P-256, {sl.agent.clients} clients; {sl.settings}): agent "
            f"{_n(sl.agent.rate)}/s p50 {_n(sl.agent.p50, '.2f')} ms p99 {_n(sl.agent.p99, '.2f')} ms, "
            f"{_n(sl.agent.server_cpu_per_request_us)} us CPU per request; ssh-agent "
            f"{_n(sl.ssh.rate) if sl.ssh else 'n/a'}/s p50 {_n(sl.ssh.p50, '.2f') if sl.ssh else 'n/a'} ms"
        )
    err_parts = []
    for algo in run.algos:
        for row in algo.rows:
            for who, cell in (("agent", row.agent), ("ssh-agent", row.ssh)):
                if cell is not None and cell.total_errors:
                    err_parts.append(f"{NAMES[algo.kind]} {who} @{row.clients}: {cell.total_errors}")
    verified = sum(cell.verified for a in run.algos for r in a.rows for cell in (r.agent, r.ssh) if cell)
    bad = sum(cell.bad_signatures for a in run.algos for r in a.rows for cell in (r.agent, r.ssh) if cell)
    lim_bad = sum(lim.bad_signatures for a in run.algos for lim in (a.limit_1, a.limit_n) if lim)
    lines.append(
        f"errors: {'; '.join(err_parts) or 'none'} (ceiling run: {c.total_errors}); signatures verified: "
        f"{verified} sampled, {bad + lim_bad} bad"
    )
    examples = [e for a in run.algos for r in a.rows for cell in (r.agent, r.ssh) if cell for e in cell.error_examples]
    for e in examples[:5]:
        lines.append(f"  e.g. {e}")
    reused = sum(cell.reused for a in run.algos for r in a.rows for cell in (r.agent, r.ssh) if cell)
    if reused:
        lines.append(f"note: {reused} requests reused a challenge within one cell (raise --pool)")
    late = [lim for a in run.algos for lim in (a.limit_1, a.limit_n) if lim and lim.late > 0.05]
    if late:
        lines.append("note: an in-process signer started late; its rate is scaled to its own window")
    lines.append("")
    lines.extend(ch.line() for ch in checks(run))
    spent = budgets(run)
    if spent:
        lines.append("")
        lines.append("CPU budget per request that each throughput target implies on this machine:")
        lines.extend(f"  {line}" for line in spent)
    return "\n".join(lines)


def to_json(run: RunResult) -> dict[str, Any]:
    """Machine-readable results (``--json``), for comparing runs."""

    def cell(c: CellResult | None) -> dict[str, Any] | None:
        if c is None:
            return None
        return {"clients": c.clients, "rate": c.rate, "p50_ms": c.p50, "p99_ms": c.p99, "errors": c.total_errors,
                "verified": c.verified, "loadgen_cpu_us_per_req": c.cpu_per_request_us,
                "server_cpu_us_per_req": c.server_cpu_per_request_us,
                "round_rates": [r.rate for r in c.rounds]}  # fmt: skip

    def lim(x: LimitResult | None) -> dict[str, Any] | None:
        if x is None:
            return None
        return {"processes": x.processes, "rate": x.rate, "bad": x.bad_signatures,
                "cpu_us_per_sig": x.cpu_per_signature_us, "round_rates": [r.rate for r in x.rounds]}  # fmt: skip

    return {
        "cores": run.cores,
        "fsync_ms": run.fsync_ms,
        "fsync_cpu_us": run.fsync_cpu_us,
        "stolen": run.stolen,
        "background_busy": [run.busy_before, run.busy_after],
        "workers": run.workers,
        "loadgen_procs": run.loadgen_procs,
        "rounds": run.rounds,
        "duration": run.duration,
        "message_bytes": run.message_bytes,
        "algorithms": {
            a.kind: {
                "rows": [{"clients": r.clients, "agent": cell(r.agent), "ssh_agent": cell(r.ssh)} for r in a.rows],
                "limit_1": lim(a.limit_1),
                "limit_n": lim(a.limit_n),
            }
            for a in run.algos
        },
        "ceiling": cell(run.ceiling),
        "agent_peak_rss_kib": {str(k): v for k, v in run.rss_kib.items()},
        "slow_hsm": None
        if run.slow is None
        else {
            "sign_ms": run.slow.sign_ms,
            "sessions": run.slow.sessions,
            "settings": run.slow.settings,
            "agent": cell(run.slow.agent),
            "ssh_agent": cell(run.slow.ssh),
        },
        "audit_bytes": run.audit_bytes,
        "agent_signatures": run.agent_signatures(),
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks(run)],
    }
