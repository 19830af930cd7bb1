"""``python -m bench``: set everything up, measure every cell, print the report, clean up.

Exit status: 0 when the benchmark ran (whether or not the targets were met), 2 when a required tool is
missing, 1 when set-up or a measurement itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import ServerConfig
from bench import limit, report, slowhsm, sshagent
from bench.env import (
    KINDS,
    TOKEN_LABEL,
    AgentProcess,
    BenchEnv,
    SetupError,
    SshAgent,
    background_busy,
    cred_id_for,
    fsync_probe,
    key_label,
    steal_ticks,
)
from bench.env import unix_http_get as http_get
from bench.loadgen import NOOP, SIGN, SSH, CellResult, LoadGen, LoadGenError, Target, client_data, make_challenge


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Agent vs. ssh-agent vs. in-process python-pkcs11 on one SoftHSM token: sig/s, p50/p99.",
    )
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell (default 3)")
    p.add_argument("--quick", action="store_true", help="1 s per cell and shorter warm-ups")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure every cell this many times, interleaved; rates are the median round's "
                        "(default 3)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2,
                   help="agent worker processes ([server] workers; default 2, as the README sets SoftHSM)")  # fmt: skip
    p.add_argument("--sign-threads", type=int, default=0,
                   help="agent signing threads per worker ([server] sign_threads; default 0 = sign on the event "
                        "loop, the README's setting for fast local tokens)")  # fmt: skip
    p.add_argument("--clients", default="1,4,16,64", help="concurrency levels (default 1,4,16,64)")
    p.add_argument("--loadgen-procs", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--pool", type=int, default=20000, help="pre-built requests per load generator process and kind")
    p.add_argument("--sample", type=int, default=100,
                   help="answers per load generator process and cell whose signatures are verified")  # fmt: skip
    p.add_argument("--slow-ms", type=float, default=2.0,
                   help="also measure P-256 behind a filter module that holds each signature this long, like a "
                        "network HSM (default 2; 0 skips it)")  # fmt: skip
    p.add_argument("--slow-clients", type=int, default=64, help="clients for the slow-HSM cells (default 64)")
    p.add_argument("--slow-sign-threads", type=int, default=None,
                   help="the agent's sign_threads for the slow-HSM cells (default: the agent's own)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (token, logs) for inspection")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 1.0)
    args.warmup = 0.3 if args.quick else 0.5
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error("--clients takes comma-separated integers")
    if args.workers < 1 or args.loadgen_procs < 1 or args.rounds < 1 or args.duration <= 0 or not args.clients:
        p.error("--workers, --loadgen-procs, --rounds, --duration and --clients must be positive")
    return args


def _check_tools() -> str | None:
    missing = [t for t in ("ssh-agent", "ssh-add") if shutil.which(t) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not found: the benchmark compares the agent with OpenSSH's ssh-agent.\n"
            "Install it with: apt-get install openssh-client"
        )
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util not found. Install it with: apt-get install softhsm2 (or run ./softhsm_setup.sh test)"
    return None


def _agent_keys_match(agent: AgentProcess, env: BenchEnv) -> str:
    """The agent must serve the very keys generated for the benchmark; returns its version string."""
    status, body = http_get(str(agent.socket_path), "/v1/credentials")
    if status != 200:
        raise SetupError(f"GET /v1/credentials answered {status}: {body[:200]!r}")
    served = {c["name"]: c["publicKey"] for c in json.loads(body)["credentials"]}
    for kind in KINDS:
        if served.get(kind, "").strip() != env.public_pems[kind].strip():
            raise SetupError(f"the agent's credential {kind!r} is not the benchmark's key")
    status, body = http_get(str(agent.socket_path), "/v1/health")
    return str(json.loads(body).get("version", "")) if status == 200 else ""


CpuSeconds = Callable[[], float]  # CPU used so far by the process tree that serves a target
Cell = Callable[[Target, int, str, CpuSeconds], CellResult]


def _rounds(
    args: argparse.Namespace,
    cell: Cell,
    targets: dict[str, Target],
    agent_cpu: CpuSeconds,
    ssh_target: Target,
    ssh_cpu: CpuSeconds,
    jobs: dict[str, limit.LimitJob],
) -> list[report.AlgoResult]:
    """Measure every cell ``args.rounds`` times and pool the rounds.

    Each round measures every cell once, in the same order, so a slow spell on the machine lands on one
    round of each contender rather than on one contender. The idle agent and ssh-agent stay up while the
    in-process signers run.
    """
    n = max(2, args.workers)
    warm = 1.0 if args.quick else 1.5
    agent_cells: dict[tuple[str, int], list[CellResult]] = {}
    ssh_cells: dict[int, list[CellResult]] = {}
    limits: dict[tuple[str, int], list[limit.LimitResult]] = {}
    for r in range(1, args.rounds + 1):
        _log(f"round {r} of {args.rounds}")
        for kind in KINDS:
            for clients in args.clients:
                agent_cells.setdefault((kind, clients), []).append(
                    cell(targets[kind], clients, f"agent {kind}", agent_cpu)
                )
                if kind == "p256":
                    ssh_cells.setdefault(clients, []).append(cell(ssh_target, clients, "ssh-agent p256", ssh_cpu))
        for kind in KINDS:
            try:
                one = limit.measure(jobs[kind], 1, warm)
                many = limit.measure(jobs[kind], n, warm + 0.5 * n)
            except RuntimeError as e:
                raise SetupError(str(e)) from None
            limits.setdefault((kind, 1), []).append(one)
            limits.setdefault((kind, n), []).append(many)
            _log(f"limit {kind}: 1 process {one.rate:,.0f}/s, {n} processes {many.rate:,.0f}/s")

    algos = []
    for kind in KINDS:
        algo = report.AlgoResult(
            kind,
            limit_1=limit.LimitResult.pooled(limits[kind, 1]),
            limit_n=limit.LimitResult.pooled(limits[kind, n]),
        )
        for clients in args.clients:
            row = report.Row(clients, CellResult.pooled(agent_cells[kind, clients]))
            if kind == "p256":
                row.ssh = CellResult.pooled(ssh_cells[clients])
            algo.rows.append(row)
        algos.append(algo)
    return algos


def _ssh_key_blob(ssh: SshAgent, env: BenchEnv, what: str) -> bytes:
    """Load the token into ``ssh`` and return the identity blob of the benchmark's P-256 key in it."""
    ssh.load_token()
    p256_public = serialization.load_pem_public_key(env.public_pems["p256"].encode())
    assert isinstance(p256_public, ec.EllipticCurvePublicKey)
    try:
        return sshagent.check(str(ssh.socket_path), p256_public)
    except (ValueError, OSError) as e:
        raise SetupError(f"{what}: {e}") from None


def _slow(args: argparse.Namespace, env: BenchEnv, lg: LoadGen, cell: Callable[..., CellResult]) -> report.SlowResult:
    """P-256 on the same token behind the slow-HSM filter, agent and ssh-agent, ``args.rounds`` rounds each.

    The agent runs with ``--workers`` and its default ``sign_threads`` (or ``--slow-sign-threads``): how close
    the defaults get is what the target measures."""
    try:
        module = str(slowhsm.build())
    except slowhsm.BuildError as e:
        raise SetupError(str(e)) from None
    extra = slowhsm.environ(env.module, args.slow_ms)
    env.write_config(args.workers, args.slow_sign_threads, module=module, module_env=extra)
    threads = args.slow_sign_threads if args.slow_sign_threads is not None else ServerConfig().sign_threads
    sessions = args.workers * max(1, threads)
    settings = f"workers={args.workers}, sign_threads={threads}" + (
        "" if args.slow_sign_threads is not None else " (the default)"
    )
    agent = AgentProcess(env)
    ssh: SshAgent | None = None
    try:
        agent.wait_ready()
        _agent_keys_match(agent, env)
        ssh = SshAgent(env, module=module, extra_env=extra, name="ssh-agent-slow")
        blob = _ssh_key_blob(ssh, env, "ssh-agent (slow HSM)")
        target = Target(SIGN, str(agent.socket_path), "p256", cred_id_for("p256"), env.public_pems["p256"])
        ssh_target = Target(SSH, str(ssh.socket_path), "", "", env.public_pems["p256"], blob)
        lg.prepare(target)
        lg.prepare(ssh_target)
        agent_rounds, ssh_rounds = [], []
        for _ in range(args.rounds):
            agent_rounds.append(cell(target, args.slow_clients, "agent slow p256", agent.cpu_seconds))
            ssh_rounds.append(cell(ssh_target, args.slow_clients, "ssh-agent slow p256", ssh.cpu_seconds))
        return report.SlowResult(
            sign_ms=args.slow_ms,
            sessions=sessions,
            settings=settings,
            agent=CellResult.pooled(agent_rounds),
            ssh=CellResult.pooled(ssh_rounds),
        )
    finally:
        if ssh is not None:
            ssh.stop()
        rc = agent.stop()
        if rc not in (0, -15):
            _log(f"agent (slow HSM) exited with {rc}; its log:\n{agent.output()}")


def run(args: argparse.Namespace) -> report.RunResult:
    busy_before = background_busy()
    steal0 = steal_ticks()
    env = BenchEnv.create()
    fsync = fsync_probe(env.dir)
    _log(f"token {TOKEN_LABEL!r} with Ed25519 and P-256 keys in {env.dir}")
    agent: AgentProcess | None = None
    ssh: SshAgent | None = None
    lg: LoadGen | None = None
    try:
        env.write_config(args.workers, args.sign_threads)
        agent = AgentProcess(env)
        agent.wait_ready()
        version = _agent_keys_match(agent, env)
        _log(f"agent pid {agent.pid} on {agent.socket_path} (workers={args.workers}, sign_threads={args.sign_threads})")

        ssh = SshAgent(env)
        blob = _ssh_key_blob(ssh, env, "ssh-agent")
        _log(f"ssh-agent pid {ssh.proc.pid} holds the P-256 key from PKCS#11")

        lg = LoadGen(args.loadgen_procs, args.pool)
        sock = str(agent.socket_path)
        targets = {kind: Target(SIGN, sock, kind, cred_id_for(kind), env.public_pems[kind]) for kind in KINDS}
        ssh_target = Target(SSH, str(ssh.socket_path), "", "", env.public_pems["p256"], blob)
        noop = Target(NOOP, sock)
        for t in (*targets.values(), ssh_target, noop):
            lg.prepare(t)
        _log(f"load generator: {args.loadgen_procs} processes, {args.pool} pre-built requests each per kind")

        def cell(target: Target, clients: int, label: str, server_cpu: CpuSeconds) -> CellResult:
            cpu0 = server_cpu()
            c = lg.run(target, clients, args.duration, args.warmup, args.sample)  # type: ignore[union-attr]
            c.server_cpu = server_cpu() - cpu0
            _log(f"{label:<22} {clients:>3} clients: {c.rate:>9,.0f}/s  p50 {c.p50 or 0:.2f} ms  "
                 f"p99 {c.p99 or 0:.2f} ms  server CPU {c.server_cpu_per_request_us or 0:,.0f} us/req  "
                 f"errors {c.total_errors}")  # fmt: skip
            return c

        jobs = {
            kind: limit.LimitJob(
                module=env.module,
                token_label=TOKEN_LABEL,
                softhsm_conf=str(env.softhsm_conf),
                pin=env.pin,
                key_label=key_label(kind),
                start_at=0.0,
                duration=args.duration,
            )
            for kind in KINDS
        }
        ceiling = cell(noop, max(args.clients), "GET /v1/credentials", agent.cpu_seconds)
        algos = _rounds(args, cell, targets, agent.cpu_seconds, ssh_target, ssh.cpu_seconds, jobs)
        rss = agent.peak_rss()
        agent_pid = agent.pid
        ssh.stop()
        ssh = None
        agent.stop()
        agent = None
        audit_bytes = sum(p.stat().st_size for p in (env.dir / "state").rglob("*") if p.is_file())
        slow = _slow(args, env, lg, cell) if args.slow_ms > 0 else None
        lg.close()
        lg = None

        busy_after = background_busy()
        steal1 = steal_ticks()
        return report.RunResult(
            workers=args.workers,
            loadgen_procs=args.loadgen_procs,
            rounds=args.rounds,
            duration=args.duration,
            message_bytes=len(client_data(make_challenge("")["challenge"])),
            algos=algos,
            ceiling=ceiling,
            rss_kib=rss,
            agent_pid=agent_pid,
            agent_version=version,
            cores=os.cpu_count() or 0,
            busy_before=busy_before,
            busy_after=busy_after,
            fsync_ms=fsync.median_ms,
            fsync_cpu_us=fsync.cpu_us,
            stolen=(steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1]),
            audit_bytes=audit_bytes,
            slow=slow,
        )
    finally:
        if lg is not None:
            lg.close()
        if ssh is not None:
            ssh.stop()
        if agent is not None:
            rc = agent.stop()
            if rc not in (0, -15):
                _log(f"agent exited with {rc}; its log:\n{agent.output()}")
        if args.keep:
            _log(f"kept {env.dir}")
        else:
            env.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = _check_tools()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        result = run(args)
    except (SetupError, LoadGenError) as e:
        print(f"bench: cannot run: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(report.render(result))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report.to_json(result), indent=2) + "\n")
    return 0
