"""``python -m bench.http_layer``: the agent's own HTTP server against uvicorn, the HTTP layer alone.

Issue 14 asks whether a well-kept server (uvicorn with a raw ASGI app, httptools and uvloop, on the Unix
socket) would do as well as ``agent/transport/http.py``. Both run here in their own process with uvloop and
serve the same fixed JSON answer to the benchmark's ``GET /v1/credentials`` load, so the difference is what
each costs per request before any route runs. Rates, p50/p99 and each server's CPU per request, in
interleaved rounds; a PASS/FAIL line says whether uvicorn came within 10% of the agent's server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.env import ROOT, tree_cpu_seconds
from bench.loadgen import NOOP, CellResult, LoadGen, Target

BODY = b'{"credentials":[{"name":"p256","keyType":"p256","credId":"Y3ItYmVuY2g"}]}'
WITHIN = 0.10  # uvicorn is preferred when its rate is within this fraction of the agent's server


def _own(path: str) -> None:
    """The agent's HTTP server with a handler that answers at once."""
    import uvloop

    from agent.transport.http import Limits, Request, Response, Server

    async def handler(request: Request) -> Response:
        return Response(200, BODY)

    async def main() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(1024)
        server = Server(handler, Limits(max_connections=4096))
        await server.start(sock)
        await asyncio.Event().wait()

    uvloop.run(main())


def _uvicorn(path: str) -> None:
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:  # the request body, if any
            more = (await receive()).get("more_body", False)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY})

    config = uvicorn.Config(app, uds=path, loop="uvloop", http="httptools", lifespan="off", access_log=False,
                            log_level="warning", backlog=1024, limit_concurrency=None)  # fmt: skip
    uvicorn.Server(config).run()


def _start(kind: str, path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.http_layer", "--serve", kind, str(path)], cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {kind} server exited with {proc.returncode}")
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(path))
                return proc
            except OSError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the {kind} server did not listen on {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.http_layer", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    p.add_argument("--serve", nargs=2, metavar=("KIND", "SOCKET"), help=argparse.SUPPRESS)
    p.add_argument("--clients", default="16,64")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loadgen-procs", type=int, default=2)
    args = p.parse_args(argv)
    if args.serve:
        kind, path = args.serve
        {"own": _own, "uvicorn": _uvicorn}[kind](path)
        return 0
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        print("bench.http_layer: uvicorn is not installed (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="dfh-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    lg: LoadGen | None = None
    cells: dict[tuple[str, int], list[CellResult]] = {}
    try:
        for kind in ("own", "uvicorn"):
            procs[kind] = _start(kind, tmp / f"{kind}.sock")
        lg = LoadGen(args.loadgen_procs, 1000)
        targets = {kind: Target(NOOP, str(tmp / f"{kind}.sock")) for kind in procs}
        for t in targets.values():
            lg.prepare(t)
        for r in range(1, args.rounds + 1):
            for n in clients:
                for kind, target in targets.items():
                    cpu0 = tree_cpu_seconds(procs[kind].pid)
                    c = lg.run(target, n, args.duration, 0.3, 0)
                    c.server_cpu = tree_cpu_seconds(procs[kind].pid) - cpu0
                    cells.setdefault((kind, n), []).append(c)
                    print(f"[round {r}] {kind:<8} {n:>3} clients: {c.rate:>9,.0f}/s p50 {c.p50 or 0:.2f} ms "
                          f"CPU {c.server_cpu_per_request_us or 0:,.0f} us/req errors {c.total_errors}",
                          file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if lg is not None:
            lg.close()
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"HTTP layer alone: GET /v1/credentials, fixed answer, {args.duration:g} s cells, {args.rounds} rounds, "
        f"{os.cpu_count()} cores; agent = agent/transport/http.py, uvicorn = raw ASGI app (httptools, uvloop)"
    )
    print(f"{'clients':>7}  {'server':<8}  {'req/s':>9}  {'p50 ms':>7}  {'p99 ms':>7}  {'CPU us/req':>10}  errors")
    for n in clients:
        for kind in ("own", "uvicorn"):
            c = CellResult.pooled(cells[kind, n])
            print(f"{n:>7}  {'agent' if kind == 'own' else kind:<8}  {c.rate:>9,.0f}  {c.p50 or 0:>7.2f}  "
                  f"{c.p99 or 0:>7.2f}  {c.server_cpu_per_request_us or 0:>10,.0f}  {c.total_errors}")  # fmt: skip
    for n in clients:
        print(verdict_line(n, cells["own", n], cells["uvicorn", n]))
    return 0


def verdict_line(clients: int, own_rounds: list[CellResult], uv_rounds: list[CellResult]) -> str:
    """The PASS/FAIL line for one concurrency; N/A when either server failed requests (a rate counts only
    the answers, so a server that fails looks faster or slower than it serves)."""
    own, uv = CellResult.pooled(own_rounds), CellResult.pooled(uv_rounds)
    ratio = uv.rate / own.rate if own.rate else 0.0
    rounds = ", ".join(f"{b.rate / a.rate:.2f}x" for a, b in zip(own_rounds, uv_rounds, strict=True) if a.rate)
    verdict = "PASS" if ratio >= 1 - WITHIN else "FAIL"
    if own.total_errors or uv.total_errors:
        verdict = (
            f"N/A   no verdict: the agent's server failed {own.total_errors}, uvicorn {uv.total_errors} request(s);"
        )
    extra = (uv.server_cpu_per_request_us or 0) - (own.server_cpu_per_request_us or 0)
    return (f"{verdict}  @{clients} clients, uvicorn within {WITHIN:.0%} of the agent's HTTP layer: {ratio:.2f}x "
            f"({uv.rate:,.0f}/s vs {own.rate:,.0f}/s; per round {rounds}); uvicorn's CPU per request "
            f"{extra:+,.0f} us")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
