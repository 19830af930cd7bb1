"""``python -m bench.flow``: the whole Dfns flow, the agent against the official Python SDK signing in-process.

Both contenders create wallets on the local Dfns-compatible API (``dfns-agent dev-dfns``, its own process,
holding every request ``--latency-ms`` like a distant API) as the same service account with the same P-256
key: the SDK holds it as a PEM and signs in the caller's process (``dfns_sdk.auth.KeySigner``); the agent
has it on a SoftHSM token (imported from the same PEM) and runs init → sign → action → call itself for
each ``POST /v1/request``. Each client is a thread with its own keep-alive client, as an application's
worker threads would be. The dev server verifies every signature and user action, so an answered 200 is a
verified flow.

Targets (issue 14, item 4), printed, never asserted: the agent adds <= 1 ms at p50 at one client; 256
concurrent flows sustain >= 0.9x the SDK's throughput with zero errors and bounded memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.client import AgentClient
from agent.config import ServerConfig
from agent.dfns import cred_id_for_key
from bench.env import ROOT, TOKEN_LABEL, AgentProcess, BenchEnv, SetupError, tree_cpu_seconds
from bench.loadgen import percentile_ms

FLOW_KEY = "dfns-bench-flow"
BODY = {"network": "EthereumSepolia", "name": "bench"}
MIB = 1024.0
P50_TARGET_MS = 1.0
RATE_TARGET = 0.9
RSS_LIMIT_MIB = 80.0


def _log(msg: str) -> None:
    print(f"[bench.flow {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# Results


@dataclass
class FlowCell:
    """One contender at one concurrency, one round."""

    clients: int
    duration: float
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered flow
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process group during the cell

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.duration if self.duration else 0.0

    def percentile(self, q: float) -> float | None:
        return percentile_ms(self.latencies, q)

    def cpu_per_flow_us(self, who: str) -> float | None:
        return self.cpu[who] / len(self.latencies) * 1e6 if who in self.cpu and self.latencies else None


@dataclass
class Pooled:
    """Several rounds of one cell: the median round's rate; latencies, errors and CPU over all rounds."""

    rounds: list[FlowCell]

    @property
    def clients(self) -> int:
        return self.rounds[0].clients

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.rounds)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rounds)

    @property
    def p50(self) -> float | None:
        return percentile_ms([x for r in self.rounds for x in r.latencies], 50)

    @property
    def p99(self) -> float | None:
        return percentile_ms([x for r in self.rounds for x in r.latencies], 99)

    def cpu_per_flow_us(self, who: str) -> float | None:
        flows = sum(len(r.latencies) for r in self.rounds)
        spent = sum(r.cpu.get(who, 0.0) for r in self.rounds)
        return spent / flows * 1e6 if flows else None

    def examples(self) -> list[str]:
        return [e for r in self.rounds for e in r.error_examples]


@dataclass
class FlowRun:
    latency_ms: float
    duration: float
    rounds: int
    sdk: dict[int, Pooled]
    agent: dict[int, Pooled]
    agent_rss_kib: dict[int, int]
    cores: int


@dataclass
class Verdict:
    name: str
    ok: bool | None
    detail: str

    def line(self) -> str:
        return f"{ {True: 'PASS', False: 'FAIL', None: 'N/A '}[self.ok] }  {self.name}: {self.detail}"


def verdicts(run: FlowRun) -> list[Verdict]:
    out = []
    one_a, one_s = run.agent.get(1), run.sdk.get(1)
    name = f"flow @1 client, the agent adds <= {P50_TARGET_MS:g} ms at p50 over the SDK signing in-process"
    if one_a and one_s and one_a.p50 is not None and one_s.p50 is not None:
        added = one_a.p50 - one_s.p50
        out.append(Verdict(name, added <= P50_TARGET_MS,
                           f"{added:+.2f} ms (agent {one_a.p50:.2f} ms, SDK {one_s.p50:.2f} ms; "
                           f"{3 * run.latency_ms:g} ms of it is the API's latency)"))  # fmt: skip
    else:
        out.append(Verdict(name, None, "not measured"))
    top = max(run.agent, default=None)
    name = f"flow @{top} clients, agent >= {RATE_TARGET:g}x the SDK's throughput"
    if top is not None and top in run.sdk and run.sdk[top].rate:
        a, s = run.agent[top], run.sdk[top]
        r = a.rate / s.rate
        per_round = ", ".join(f"{x.rate / y.rate:.2f}x" for x, y in zip(a.rounds, s.rounds, strict=True) if y.rate)
        out.append(Verdict(name, r >= RATE_TARGET,
                           f"{r:.2f}x ({a.rate:,.0f}/s vs {s.rate:,.0f}/s; per round {per_round})"))  # fmt: skip
    else:
        out.append(Verdict(name, None, "not measured"))
    errors = sum(p.errors for p in run.agent.values())
    out.append(Verdict("flow: agent zero errors", errors == 0, f"{errors} error(s)"))
    if run.agent_rss_kib:
        worst = max(run.agent_rss_kib.values()) / MIB
        out.append(Verdict(f"flow: agent peak RSS < {RSS_LIMIT_MIB:g} MB per process", worst < RSS_LIMIT_MIB,
                           f"largest {worst:.1f} MiB after {max(run.agent)} concurrent flows"))  # fmt: skip
    else:
        out.append(Verdict(f"flow: agent peak RSS < {RSS_LIMIT_MIB:g} MB per process", None, "could not read /proc"))
    return out


def render(run: FlowRun) -> str:
    lines = [
        f"dfns-agent whole-flow benchmark: POST /wallets on dev-dfns with {run.latency_ms:g} ms per API call, "
        f"{run.duration:g} s per cell, {run.rounds} round(s) interleaved; {run.cores} cores",
        "sdk = dfns_sdk DfnsClient + KeySigner in-process (3 API calls per flow); agent = POST /v1/request over "
        "the Unix socket (the agent makes the 3 calls); CPU columns: us per flow of each process group",
        "",
        f"{'clients':>7}  {'who':<5}  {'flows/s':>9}  {'p50 ms':>8}  {'p99 ms':>8}  {'errors':>6}  "
        f"{'client us':>9}  {'agent us':>8}  {'dfns us':>8}",
    ]
    for clients in sorted(run.sdk):
        for who, cell in (("sdk", run.sdk[clients]), ("agent", run.agent.get(clients))):
            if cell is None:
                continue

            def us(k: str, c: Pooled = cell) -> str:
                v = c.cpu_per_flow_us(k)
                return "-" if v is None else f"{v:,.0f}"

            lines.append(
                f"{clients:>7}  {who:<5}  {cell.rate:>9,.0f}  {cell.p50 or 0:>8.2f}  {cell.p99 or 0:>8.2f}  "
                f"{cell.errors:>6}  {us('client'):>9}  {us('agent'):>8}  {us('dfns'):>8}"
            )
    examples = [e for p in (*run.agent.values(), *run.sdk.values()) for e in p.examples()]
    lines.extend(f"  e.g. {e}" for e in examples[:5])
    rss = ", ".join(f"pid {pid} {kib / MIB:.1f} MiB" for pid, kib in run.agent_rss_kib.items())
    lines.append(f"agent peak RSS (VmHWM) per process: {rss or 'n/a'}")
    lines.append("")
    lines.extend(v.line() for v in verdicts(run))
    return "\n".join(lines)


def to_json(run: FlowRun) -> dict[str, Any]:
    def cell(p: Pooled) -> dict[str, Any]:
        return {"clients": p.clients, "rate": p.rate, "p50_ms": p.p50, "p99_ms": p.p99, "errors": p.errors,
                "flows": sum(len(r.latencies) for r in p.rounds), "round_rates": [r.rate for r in p.rounds],
                "cpu_us_per_flow": {k: p.cpu_per_flow_us(k) for k in ("client", "agent", "dfns")}}  # fmt: skip

    return {
        "latency_ms": run.latency_ms,
        "duration": run.duration,
        "rounds": run.rounds,
        "sdk": [cell(p) for p in run.sdk.values()],
        "agent": [cell(p) for p in run.agent.values()],
        "agent_peak_rss_kib": {str(k): v for k, v in run.agent_rss_kib.items()},
        "checks": [{"name": v.name, "ok": v.ok, "detail": v.detail} for v in verdicts(run)],
    }


# ------------------------------------------------------------------------------------------------------
# The world: token with the imported key, dev-dfns, the agent


@dataclass
class DevDfnsProcess:
    proc: subprocess.Popen[str]
    url: str
    token: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _import_key(env: BenchEnv) -> tuple[str, str]:
    """A P-256 key made in software, imported into the token: (its PKCS#8 PEM for the SDK, its credId)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pem_file = env.dir / "flow-key.pem"
    pem_file.write_bytes(pem)
    pem_file.chmod(0o600)
    r = subprocess.run(
        ["softhsm2-util", "--import", str(pem_file), "--token", TOKEN_LABEL, "--label", FLOW_KEY, "--id", "f10f",
         "--pin", env.pin],
        env=env.environ(), capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        raise SetupError(f"softhsm2-util --import failed: {r.stderr.strip() or r.stdout.strip()}")
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    (env.dir / "flow-key.pub.pem").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pem.decode(), cred_id_for_key(spki)


def _start_dev_dfns(env: BenchEnv, latency_ms: float) -> DevDfnsProcess:
    tokens = env.dir / "dfns"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "dev-dfns", "--port", "0", "--latency-ms", str(latency_ms),
         "--service-account", f"flow={env.dir / 'flow-key.pub.pem'}", "--tokens-dir", str(tokens)],
        cwd=ROOT, env=env.environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", first)
    if not match:
        proc.kill()
        raise SetupError(f"dev-dfns did not start: {first}{proc.stdout.read()[:2000]}")
    proc.stdout.readline()  # the account line
    return DevDfnsProcess(proc, match.group(1), (tokens / "flow.token").read_text().strip())


def _write_agent_config(env: BenchEnv, workers: int, sign_threads: int | None, url: str, clients: int) -> None:
    # Every client is this process's uid, and one worker may hold all of their connections (a burst of
    # connects is accepted by whichever worker is free): the per-uid bound, which is per worker, must admit
    # them all, and the connection bound leave room above it, as the README's sizing rule says.
    per_uid = max(clients, ServerConfig.max_connections_per_uid)
    limits = {"max_connections_per_uid": per_uid, "max_connections": max(2 * per_uid, ServerConfig.max_connections)}
    env.write_config(workers, sign_threads, server=limits)
    with env.config.open("a") as f:
        f.write(
            f'\n[[credential]]\nname = "flow"\nkey = "{FLOW_KEY}"\n'
            f'[credential.dfns]\nbase_url = "{url}"\ntoken_file = "{env.dir / "dfns" / "flow.token"}"\n'
        )


@contextmanager
def world(args: argparse.Namespace) -> Iterator[tuple[BenchEnv, DevDfnsProcess, AgentProcess, str, str]]:
    env = BenchEnv.create()
    dfns: DevDfnsProcess | None = None
    agent: AgentProcess | None = None
    try:
        pem, cred_id = _import_key(env)
        dfns = _start_dev_dfns(env, args.latency_ms)
        _write_agent_config(env, args.workers, args.sign_threads, dfns.url, max(args.clients))
        agent = AgentProcess(env)
        agent.wait_ready()
        yield env, dfns, agent, pem, cred_id
    finally:
        if agent is not None:
            rc = agent.stop()
            if rc not in (0, -15):
                _log(f"agent exited with {rc}; its log:\n{agent.output()}")
        if dfns is not None:
            dfns.stop()
        if not args.keep:
            env.cleanup()


# ------------------------------------------------------------------------------------------------------
# Driving the flows

Call = Callable[[], None]  # one whole flow; raises on any failure


STRAGGLER_SECONDS = 60.0  # after the window, how long a flow in progress may take before it counts as an error


def drive(make: Callable[[], tuple[Call, Callable[[], None]]], clients: int, duration: float, warmup: float,
          cpu: dict[str, Callable[[], float]], straggler_seconds: float = STRAGGLER_SECONDS) -> FlowCell:  # fmt: skip
    """``clients`` threads, each with its own client from ``make`` (call, close), flowing back to back.

    Every thread builds its client and runs ``warmup`` seconds before the measured window opens, so the
    window sees steady state; flows that finish inside it count toward the rate and latencies (by their end
    time). Errors count whenever they happen, as the load generator of ``python -m bench`` counts them: a
    flow that fails in the warm-up or after the window, a client that could not be made, and a flow still
    running ``straggler_seconds`` after the window are errors too."""
    cell = FlowCell(clients, duration)
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    start_at = [float("inf")]
    stop = threading.Event()
    done = [False]  # set once the cell is returned: a straggler that ends later changes nothing

    def failed(why: str) -> None:
        with lock:
            if done[0]:
                return
            cell.errors += 1
            if len(cell.error_examples) < 3:
                cell.error_examples.append(why)

    def worker() -> None:
        try:
            call, close = make()
        except Exception as e:  # noqa: BLE001 - counted; the other clients still run
            failed(f"making the client: {type(e).__name__}: {str(e)[:200]}")
            ready.wait()
            return
        try:
            ready.wait()
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    call()
                except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                    failed(f"{type(e).__name__}: {str(e)[:200]}")
                    continue
                t1 = time.monotonic()
                if start_at[0] <= t1 <= start_at[0] + duration:
                    with lock:
                        if not done[0]:
                            cell.latencies.append(t1 - t0)
        finally:
            close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(warmup)
    cpu0 = {k: f() for k, f in cpu.items()}
    start_at[0] = time.monotonic()
    time.sleep(duration)
    cell.cpu = {k: f() - cpu0[k] for k, f in cpu.items()}
    stop.set()
    deadline = time.monotonic() + straggler_seconds
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    for _ in range(stuck):
        failed(f"a flow still running {straggler_seconds:g} s after the window")
    with lock:
        done[0] = True
    return cell


def _sdk_client(url: str, token: str, cred_id: str, pem: str) -> tuple[Call, Callable[[], None]]:
    from dfns_sdk import DfnsClient, DfnsClientConfig
    from dfns_sdk.auth import KeySigner

    client = DfnsClient(DfnsClientConfig(auth_token=token, base_url=url, signer=KeySigner(cred_id, pem)))

    def call() -> None:
        wallet = client.wallets.create_wallet(dict(BODY))
        if not str(wallet.get("id", "")).startswith("wa-"):
            raise RuntimeError(f"unexpected answer {wallet!r}"[:200])

    return call, client.close


def _agent_client(socket_path: Path) -> tuple[Call, Callable[[], None]]:
    client = AgentClient(socket_path)

    def call() -> None:
        r = client.request("POST", "/wallets", BODY, credential="flow")
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {r.content[:200]!r}")

    return call, client.close


def run(args: argparse.Namespace) -> FlowRun:
    sdk: dict[int, list[FlowCell]] = {}
    agent_cells: dict[int, list[FlowCell]] = {}
    with world(args) as (_env, dfns, agent, pem, cred_id):
        cpu = {
            "client": time.process_time,
            "agent": agent.cpu_seconds,
            "dfns": lambda: tree_cpu_seconds(dfns.proc.pid),
        }
        _log(f"dev-dfns at {dfns.url} ({args.latency_ms:g} ms per call), agent pid {agent.pid}")
        for r in range(1, args.rounds + 1):
            for clients in args.clients:
                for who, make, cells in (
                    ("sdk", lambda: _sdk_client(dfns.url, dfns.token, cred_id, pem), sdk),
                    ("agent", lambda: _agent_client(agent.socket_path), agent_cells),
                ):
                    c = drive(make, clients, args.duration, args.warmup, cpu)
                    cells.setdefault(clients, []).append(c)
                    _log(f"round {r} {who:<5} {clients:>3} clients: {c.rate:,.0f} flows/s p50 "
                         f"{c.percentile(50) or 0:.2f} ms errors {c.errors}")  # fmt: skip
        rss = agent.peak_rss()
    return FlowRun(
        latency_ms=args.latency_ms,
        duration=args.duration,
        rounds=args.rounds,
        sdk={k: Pooled(v) for k, v in sdk.items()},
        agent={k: Pooled(v) for k, v in agent_cells.items()},
        agent_rss_kib=rss,
        cores=os.cpu_count() or 0,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.flow", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--latency-ms", type=float, default=20.0, help="dev-dfns holds every API call this long (20)")
    p.add_argument("--clients", default="1,256", help="concurrent flows per cell, comma-separated (1,256)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each cell's window opens (1)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; rates are the median round's (2)")
    p.add_argument("--workers", type=int, default=2, help="agent worker processes (2)")
    p.add_argument("--sign-threads", type=int, default=None, help="agent sign_threads (default: the agent's own)")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    args = p.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error("--clients takes comma-separated integers")
    if not args.clients or min(args.clients) < 1 or args.rounds < 1 or args.duration <= 0 or args.latency_ms < 0:
        p.error("--clients, --rounds and --duration must be positive, --latency-ms >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        result = run(args)
    except SetupError as e:
        print(f"bench.flow: cannot run: {e}", file=sys.stderr)
        return 1
    print(render(result))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(to_json(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
