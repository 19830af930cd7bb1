"""The physical limit: python-pkcs11 signing in-process on the same token, no socket, no HTTP, no JSON.

Each process is started with the 'spawn' method and loads the module itself (through the agent's own
``Token.open``, so with the same CKF_OS_LOCKING_OK re-init and anchor + worker sessions), because SoftHSM
state must never cross a fork. One thread per process: processes, not threads, are what scale on SoftHSM.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from bench.loadgen import client_data, make_challenge


@dataclass(frozen=True)
class LimitJob:
    module: str
    token_label: str
    softhsm_conf: str
    pin: str
    key_label: str
    start_at: float  # time.monotonic(), shared by all processes
    duration: float


@dataclass(frozen=True)
class LimitResult:
    processes: int
    rate: float  # signatures per second, summed over the processes (pooled: the median round's)
    message_bytes: int
    bad_signatures: int
    late: float  # seconds the slowest process missed of the window (it started after the others)
    signatures: int = 0
    cpu: float = 0.0  # CPU seconds the signing processes used in the window
    rounds: tuple[LimitResult, ...] = ()

    @property
    def cpu_per_signature_us(self) -> float | None:
        """What one signature costs the machine: python-pkcs11 plus the token, nothing else."""
        return self.cpu / self.signatures * 1e6 if self.signatures else None

    @classmethod
    def pooled(cls, rounds: list[LimitResult]) -> LimitResult:
        """The same limit measured in several rounds: the median rate, counts and CPU summed."""
        return cls(
            processes=rounds[0].processes,
            rate=statistics.median(r.rate for r in rounds),
            message_bytes=rounds[0].message_bytes,
            bad_signatures=sum(r.bad_signatures for r in rounds),
            late=max(r.late for r in rounds),
            signatures=sum(r.signatures for r in rounds),
            cpu=sum(r.cpu for r in rounds),
            rounds=tuple(rounds),
        )


class _Window(NamedTuple):
    """What one signing process reports: signatures made in its window, and what they cost."""

    signatures: int
    message_bytes: int
    bad: int
    seconds: float
    cpu: float


def _sign_loop(conn: Connection, job: LimitJob) -> None:
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        from agent.config import TokenConfig
        from agent.secret import Secret
        from agent.token import Token

        cfg = TokenConfig(module=job.module, label=job.token_label, module_env={"SOFTHSM2_CONF": job.softhsm_conf})
        messages = [client_data(make_challenge("")["challenge"]) for _ in range(4096)]
        with Token.open(cfg, Secret(job.pin, "bench")) as token:
            key = token.find_key(job.key_label)
            token.sign(key, messages[0])  # opens this thread's session and finds the key handle
            while time.monotonic() < job.start_at:
                time.sleep(0.001)
            began, end = max(time.monotonic(), job.start_at), job.start_at + job.duration
            cpu0 = time.process_time()
            count, n = 0, len(messages)
            kept = []
            monotonic = time.monotonic
            while monotonic() < end:
                msg = messages[count % n]
                sig = token.sign(key, msg)
                if count % 997 == 0:
                    kept.append((msg, sig))
                count += 1
            cpu = time.process_time() - cpu0
        bad = 0
        for msg, sig in kept:
            try:
                if isinstance(key.public_key, ed25519.Ed25519PublicKey):
                    key.public_key.verify(sig, msg)
                elif isinstance(key.public_key, ec.EllipticCurvePublicKey):
                    key.public_key.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
            except Exception:  # noqa: BLE001 - any failure to verify is a bad signature
                bad += 1
        conn.send(("ok", _Window(count, len(messages[0]), bad, max(1e-9, end - began), cpu)))
    except Exception:  # noqa: BLE001 - reported to the parent
        conn.send(("error", traceback.format_exc()))


def measure(job: LimitJob, processes: int, warmup: float = 1.5) -> LimitResult:
    """Signatures per second of ``processes`` spawned signers running at the same time.

    ``warmup`` covers spawning and module loading; the window starts for all processes at once.
    """
    ctx = multiprocessing.get_context("spawn")
    start_at = time.monotonic() + warmup
    pipes: list[Connection] = []
    procs: list[Any] = []
    for _ in range(processes):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_sign_loop, args=(child, LimitJob(**{**job.__dict__, "start_at": start_at})))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    results: list[_Window] = []
    errors: list[str] = []
    for pipe in pipes:
        try:
            status, value = pipe.recv()
        except EOFError:
            status, value = "error", "an in-process signer died without a word (see its stderr above)"
        (results if status == "ok" else errors).append(value)
    for p in procs:
        p.join(10)
    if errors:
        raise RuntimeError(f"in-process signer failed:\n{errors[0]}")
    return LimitResult(
        processes=processes,
        rate=sum(r.signatures / r.seconds for r in results),
        message_bytes=results[0].message_bytes,
        bad_signatures=sum(r.bad for r in results),
        late=max(job.duration - r.seconds for r in results),
        signatures=sum(r.signatures for r in results),
        cpu=sum(r.cpu for r in results),
    )
