"""Closed-loop load generator: P spawned processes, each driving its share of the clients with epoll.

Why this shape: on a 2-core machine a thread-per-client Python client (httpx, asyncio streams) spends
more CPU per request than the server does, and then measures itself. Here each request is pre-built
bytes (fresh challenge, made before the clock starts), each client is one keep-alive Unix socket with one
request in flight, and a response is recognised by its Content-Length (HTTP) or length prefix (ssh-agent)
without parsing anything else. The CPU each worker burns per request is measured and reported, so the
reader can see the load generator's headroom instead of having to trust it.
"""

from __future__ import annotations

import base64
import json
import math
import multiprocessing
import secrets
import select
import socket
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from bench import sshagent

# A request kind: "sign" (POST /v1/sign), "ssh" (SSH2_AGENTC_SIGN_REQUEST), "noop" (GET /v1/credentials).
SIGN, SSH, NOOP = "sign", "ssh", "noop"
DRAIN_SECONDS = 10.0  # after the window, how long in-flight answers may take before they count as errors


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_challenge(cred_id: str) -> dict[str, Any]:
    """An ``/auth/action/init`` answer shaped like Dfns's (as tests/conftest.py makes them).

    The challenge string is sized so that the clientData the agent signs is 80 bytes, a typical Dfns size.
    """
    from agent.dev.dfns_server import action_challenge

    challenge = b64url(f"ch-{secrets.token_hex(16)}".encode())
    return action_challenge(challenge, "eyJ0eXAiOiJKV1QifQ." + b64url(secrets.token_bytes(24)), [cred_id])


def client_data(challenge: str) -> bytes:
    """The exact bytes the agent signs for ``challenge`` (its own builder), so every contender signs the same size."""
    from agent.dfns import KEY_GET, ClientData

    return ClientData.build(challenge, KEY_GET).raw


def http_request(method: str, target: str, body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: agent\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def http_frame(buf: bytearray) -> int:
    """Bytes of the first complete HTTP response in ``buf`` (headers + Content-Length body), 0 if incomplete."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return 0
    head = bytes(buf[:i])
    j = head.find(b"\r\nContent-Length:")  # as agent/transport/http.py spells it; any other goes the slow way
    if j < 0:
        head = head.lower()
        j = head.find(b"\r\ncontent-length:")
        if j < 0:
            raise ValueError(f"response without Content-Length: {head[:200]!r}")
    k = head.find(b"\r\n", j + 2)
    total = i + 4 + int(head[j + 17 : k if k >= 0 else len(head)])
    return total if len(buf) >= total else 0


def http_status(response: bytes) -> int:
    return int(response[9:12])


def http_body(response: bytes) -> bytes:
    return response[response.find(b"\r\n\r\n") + 4 :]


def percentile_ms(latencies: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of latencies in seconds, in milliseconds; None without samples."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    # Nearest rank: the smallest value with at least q% of the samples at or below it, rank ceil(q/100 * n).
    # (The tolerance keeps q * n / 100 from rounding up past an exact integer in floating point.)
    rank = math.ceil(q * len(ordered) / 100 - 1e-9)
    return ordered[min(len(ordered), max(1, rank)) - 1] * 1000


@dataclass(frozen=True)
class Target:
    """What to load: which socket, which request kind, and what a correct answer must verify against."""

    kind: str
    socket: str
    credential: str = ""  # agent credential name ("sign") or "" for the others
    cred_id: str = ""
    public_pem: str = ""
    key_blob: bytes = b""  # ssh-agent identity ("ssh")

    @property
    def pool_key(self) -> tuple[str, str]:
        return (self.kind, self.credential)


@dataclass(frozen=True)
class Job:
    target: Target
    conns: int
    start_at: float  # time.monotonic() (CLOCK_MONOTONIC, shared by all processes)
    duration: float
    sample: int  # responses per worker whose signatures are verified after the window


@dataclass
class WorkerResult:
    completed: int = 0  # answers that arrived inside the window
    answered: int = 0  # every answer, warm-up and drain included (to divide the server's CPU time by)
    latencies: list[float] = field(default_factory=list)  # seconds; sent and answered inside the window
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    verified: int = 0
    bad_signatures: int = 0
    cpu: float = 0.0  # this worker's CPU seconds during the window
    reused: int = 0  # requests sent twice in one cell (pool too small for the rate)


@dataclass
class CellResult:
    """One measured cell (one contender at one concurrency), summed over the load-generator processes."""

    clients: int
    duration: float
    completed: int
    latencies: list[float]
    errors: int
    error_examples: list[str]
    verified: int
    bad_signatures: int
    cpu: float
    reused: int
    answered: int = 0
    server_cpu: float | None = None  # CPU seconds the server's process tree used during the whole cell
    rounds: list[CellResult] = field(default_factory=list)  # the rounds a pooled cell was measured in

    @property
    def server_cpu_per_request_us(self) -> float | None:
        if self.server_cpu is None or not self.answered:
            return None
        return self.server_cpu / self.answered * 1e6

    @property
    def rate(self) -> float:
        """Answers per second; for a cell measured in rounds, the median round's rate, so one round that
        a busy neighbour slowed down does not move the figure."""
        if self.rounds:
            return statistics.median(r.rate for r in self.rounds)
        return self.completed / self.duration if self.duration else 0.0

    def percentile(self, q: float) -> float | None:
        """Latency percentile in milliseconds (nearest rank), None without samples."""
        return percentile_ms(self.latencies, q)

    @property
    def p50(self) -> float | None:
        return self.percentile(50)

    @property
    def p99(self) -> float | None:
        return self.percentile(99)

    @property
    def cpu_per_request_us(self) -> float | None:
        return self.cpu / self.completed * 1e6 if self.completed else None

    @property
    def total_errors(self) -> int:
        return self.errors + self.bad_signatures

    @classmethod
    def merge(cls, clients: int, duration: float, parts: Sequence[WorkerResult | CellResult]) -> CellResult:
        """The counts of several load-generator processes, or of several rounds, added up."""
        return cls(
            clients=clients,
            duration=duration,
            completed=sum(p.completed for p in parts),
            latencies=[x for p in parts for x in p.latencies],
            errors=sum(p.errors for p in parts),
            error_examples=[e for p in parts for e in p.error_examples][:5],
            verified=sum(p.verified for p in parts),
            bad_signatures=sum(p.bad_signatures for p in parts),
            cpu=sum(p.cpu for p in parts),
            reused=sum(p.reused for p in parts),
            answered=sum(p.answered for p in parts),
        )

    @classmethod
    def pooled(cls, rounds: list[CellResult]) -> CellResult:
        """One cell measured in several rounds: the median rate (see :attr:`rate`); latencies, counts and CPU
        summed over all rounds, so p99 and the error count miss nothing any round saw."""
        cell = cls.merge(rounds[0].clients, sum(r.duration for r in rounds), rounds)
        cpus = [r.server_cpu for r in rounds]
        cell.server_cpu = None if None in cpus else sum(c for c in cpus if c is not None)
        cell.rounds = list(rounds)
        return cell


# ------------------------------------------------------------------------------------------------------
# Request pools (built before the clock starts)


@dataclass
class _Pool:
    requests: list[bytes]
    checks: list[Any]  # what the answer must match: the challenge string ("sign"), the signed data ("ssh")
    next: int = 0
    used_in_cell: int = 0


def _build_one(target: Target) -> tuple[bytes, Any]:
    if target.kind == SIGN:
        challenge = make_challenge(target.cred_id)
        body = json.dumps({"challenge": challenge, "credential": target.credential}, separators=(",", ":"))
        return http_request("POST", "/v1/sign", body.encode()), challenge["challenge"]
    if target.kind == SSH:
        data = client_data(make_challenge("")["challenge"])
        return sshagent.sign_request(target.key_blob, data), data
    return http_request("GET", "/v1/credentials"), None


def _refresh(pool: _Pool, target: Target, size: int) -> None:
    """Replace the requests a cell used with fresh ones, so the next cell never repeats a challenge."""
    if target.kind == NOOP:
        return
    for i in range(min(pool.used_in_cell, size)):
        idx = (pool.next - 1 - i) % size
        pool.requests[idx], pool.checks[idx] = _build_one(target)
    pool.used_in_cell = 0


# ------------------------------------------------------------------------------------------------------
# Verification of sampled answers (after the window)


def _load_public(pem: str) -> Any:
    return serialization.load_pem_public_key(pem.encode())


def _verify_sign(target: Target, public: Any, response: bytes, challenge: str) -> None:
    first_factor = json.loads(http_body(response))
    if first_factor.get("kind") != "Key":
        raise ValueError(f"firstFactor kind {first_factor.get('kind')!r}")
    assertion = first_factor["credentialAssertion"]
    if assertion["credId"] != target.cred_id:
        raise ValueError(f"credId {assertion['credId']!r} != {target.cred_id!r}")
    data = b64url_decode(assertion["clientData"])
    parsed = json.loads(data)
    if parsed.get("type") != "key.get" or parsed.get("challenge") != challenge:
        raise ValueError(f"clientData does not match the challenge: {data!r}")
    sig = b64url_decode(assertion["signature"])
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(sig, data)
    else:
        public.verify(sig, data, ec.ECDSA(hashes.SHA256()))


def _verify(target: Target, samples: list[tuple[bytes, Any]], result: WorkerResult) -> None:
    if target.kind == NOOP or not samples:
        return
    public = _load_public(target.public_pem)
    for response, check in samples:
        try:
            if target.kind == SIGN:
                _verify_sign(target, public, response, check)
            else:
                sshagent.verify(public, response, check)
            result.verified += 1
        except Exception as e:  # noqa: BLE001 - any failure to verify is a bad signature
            result.bad_signatures += 1
            if len(result.error_examples) < 3:
                result.error_examples.append(f"bad signature: {type(e).__name__}: {e}"[:300])


# ------------------------------------------------------------------------------------------------------
# The epoll driver


class _Client:
    __slots__ = ("sock", "buf", "sent_at", "check", "in_flight", "done")

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()
        self.sent_at = 0.0
        self.check: Any = None
        self.in_flight = False
        self.done = False


def _ok(target: Target, response: bytes) -> bool:
    if target.kind == SSH:
        return len(response) > 4 and response[4] == sshagent.SSH2_AGENT_SIGN_RESPONSE
    return http_status(response) == 200


def _describe(target: Target, response: bytes) -> str:
    if target.kind == SSH:
        return f"ssh-agent answered type {response[4] if len(response) > 4 else None}"
    return f"HTTP {http_status(response)}: {http_body(response)[:200]!r}"


def run_job(job: Job, pool: _Pool) -> WorkerResult:
    """Drive ``job.conns`` closed-loop clients until the window ends; then verify a sample of the answers."""
    target = job.target
    frame_len: Callable[[bytearray], int] = sshagent.frame_length if target.kind == SSH else http_frame
    result = WorkerResult()
    samples: list[tuple[bytes, Any]] = []
    size = len(pool.requests)
    stride = 7
    start, end = job.start_at, job.start_at + job.duration
    clients = [_Client(target.socket) for _ in range(job.conns)]
    by_fd = {c.sock.fileno(): c for c in clients}
    ep = select.epoll()
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    monotonic = time.monotonic

    def send(c: _Client) -> None:
        i = pool.next
        pool.next = (i + 1) % size
        pool.used_in_cell += 1
        c.check = pool.checks[i]
        c.sent_at = monotonic()
        c.in_flight = True
        c.sock.sendall(pool.requests[i])

    def fail(c: _Client, why: str) -> None:
        result.errors += 1
        if len(result.error_examples) < 3:
            result.error_examples.append(why[:300])

    try:
        for c in clients:
            send(c)
        cpu_start: float | None = None
        cpu_end: float | None = None
        in_window = 0
        live = len(clients)
        while live:
            now = monotonic()
            if cpu_start is None and now >= start:
                cpu_start = time.process_time()
            if cpu_end is None and now >= end:
                cpu_end = time.process_time()
            if now > end + DRAIN_SECONDS:
                for c in clients:
                    if c.in_flight:
                        fail(c, f"no answer {DRAIN_SECONDS:.0f}s after the window")
                break
            for fd, _ in ep.poll(0.05):
                c = by_fd[fd]
                try:
                    data = c.sock.recv(262144)
                except OSError as e:
                    data, why = b"", f"recv: {e}"
                else:
                    why = "connection closed by the server"
                if not data:
                    fail(c, why)
                    ep.unregister(fd)
                    c.sock.close()
                    c.in_flight, c.done = False, True
                    live -= 1
                    continue
                c.buf += data
                while c.in_flight and (n := frame_len(c.buf)):
                    t = monotonic()
                    response = bytes(c.buf[:n])
                    del c.buf[:n]
                    c.in_flight = False
                    result.answered += 1
                    if not _ok(target, response):
                        fail(c, _describe(target, response))
                    elif start <= t <= end:
                        result.completed += 1
                        in_window += 1
                        if c.sent_at >= start:
                            result.latencies.append(t - c.sent_at)
                        if in_window % stride == 0 and len(samples) < job.sample:
                            samples.append((response, c.check))
                    if t < end:
                        send(c)
                    else:  # finished: out of the poll set, so a close by the server now is no error
                        c.done = True
                        live -= 1
                        ep.unregister(fd)
        if cpu_start is not None:
            result.cpu = (cpu_end if cpu_end is not None else time.process_time()) - cpu_start
    finally:
        ep.close()
        for c in clients:
            c.sock.close()
    result.reused = max(0, pool.used_in_cell - size)
    _verify(target, samples, result)
    return result


# ------------------------------------------------------------------------------------------------------
# Worker processes


def _worker_main(conn: Connection, pool_size: int) -> None:
    """A load-generator process: builds request pools on demand and runs jobs, one at a time."""
    pools: dict[tuple[str, str], _Pool] = {}
    targets: dict[tuple[str, str], Target] = {}
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                return
            if msg[0] == "prepare":
                target: Target = msg[1]
                built = [_build_one(target) for _ in range(pool_size)]
                pools[target.pool_key] = _Pool([r for r, _ in built], [c for _, c in built])
                targets[target.pool_key] = target
                conn.send(("ok", None))
            elif msg[0] == "run":
                job: Job = msg[1]
                pool = pools[job.target.pool_key]
                result = run_job(job, pool)
                _refresh(pool, job.target, pool_size)
                conn.send(("ok", result))
        except Exception:  # noqa: BLE001 - reported to the parent, which stops the benchmark
            conn.send(("error", traceback.format_exc()))


class LoadGenError(RuntimeError):
    """A load-generator process failed outside of counting request errors (e.g. cannot connect)."""


class LoadGen:
    """``procs`` spawned worker processes, kept for the whole run so no cell pays for process start-up."""

    def __init__(self, procs: int, pool_size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs = procs
        self._pipes: list[Connection] = []
        self._workers: list[Any] = []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, pool_size), daemon=True)
            p.start()
            child.close()
            self._pipes.append(parent)
            self._workers.append(p)

    def _gather(self, pipes: list[Connection]) -> list[Any]:
        out = []
        for pipe in pipes:
            try:
                status, value = pipe.recv()
            except EOFError:
                raise LoadGenError("a load generator process died (see its stderr above)") from None
            if status != "ok":
                raise LoadGenError(f"load generator process failed:\n{value}")
            out.append(value)
        return out

    def prepare(self, target: Target) -> None:
        for pipe in self._pipes:
            pipe.send(("prepare", target))
        self._gather(self._pipes)

    def run(self, target: Target, clients: int, duration: float, warmup: float, sample: int) -> CellResult:
        shares = [clients // self.procs + (1 if i < clients % self.procs else 0) for i in range(self.procs)]
        start_at = time.monotonic() + warmup
        job = Job(target=target, conns=0, start_at=start_at, duration=duration, sample=sample)
        used = []
        for pipe, share in zip(self._pipes, shares, strict=True):
            if share:
                pipe.send(("run", replace(job, conns=share)))
                used.append(pipe)
        return CellResult.merge(clients, duration, self._gather(used))

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for p in self._workers:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join()
