"""Admission at accept, as an attacker on the same host would try it, against real agents (2 workers).

- A flood of idle connections from a uid no rule admits costs the agent nothing it needs for others: each
  one is answered 403 at once and closed, outside the connection cap.
- A flood from an *admitted* uid is bounded per uid, so other callers are still served.
- The fork/exec trick (connect, fork, the parent execs the program a rule admits, the child sends) does
  not borrow that program's identity.

Latencies are printed (``-s``) for the record; nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.dev.testing import NOBODY, SYSTEM_PYTHON, AgentProcess, TokenEnv, open_to_everyone, run_as_nobody, wait_until

FLOOD = 512
SLEEP = "/usr/bin/sleep"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another uid needs root (CI runs as root)")


@contextmanager
def idle_connections_as_nobody(path: Path, count: int, answered: int) -> Iterator[list[bytes]]:
    """A child process running as uid 65534 opens ``count`` connections and holds them until the block ends.
    It waits (up to 60 s) until the agent has answered at least ``answered`` of them unasked, then yields
    for each the first bytes the agent sent. A connection still silent then may be served or may be about to
    be turned away; which one is not raced: the child asks it for ``/v1/health`` (keeping it open) and
    yields the answer, a 200 where it is served."""
    report_r, report_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the flooding child
        code = 0
        try:
            os.close(report_r)
            os.close(stop_w)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            held = []
            for _ in range(count):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(path))
                held.append(s)
            firsts = {s: b"" for s in held}
            deadline = time.monotonic() + 60
            while sum(1 for f in firsts.values() if f) < answered and time.monotonic() < deadline:
                waiting = [s for s, f in firsts.items() if not f]
                for s in select.select(waiting, [], [], 0.5)[0]:
                    firsts[s] = s.recv(4096) or b"(closed)"
            for s in [s for s, f in firsts.items() if not f]:
                firsts[s] = one_answer(s)
            os.write(report_w, (json.dumps([f.decode("latin-1") for f in firsts.values()]) + "\n").encode())
            os.read(stop_r, 1)  # hold them until the test is done
        except BaseException:  # noqa: BLE001 - a forked child must never return into pytest
            code = 1
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(stop_r)
    try:
        with os.fdopen(report_r, "rb") as report:
            ready, _, _ = select.select([report], [], [], 60)
            assert ready, "the flooding child did not report"
            line = report.readline()
        assert line, "the flooding child failed"
        yield [s.encode("latin-1") for s in json.loads(line)]
    finally:
        os.close(stop_w)
        os.waitpid(pid, 0)


def one_answer(s: socket.socket) -> bytes:
    """Send ``GET /v1/health`` on a held connection and read one whole answer, leaving the connection open
    (a turned-away connection has its 503 waiting, and may refuse the request: the 503 is read anyway)."""
    s.settimeout(20)
    try:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
    except OSError:
        pass
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := s.recv(4096)):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length and (chunk := s.recv(4096)):
        body += chunk
    return head + b"\r\n\r\n" + body if answer else b"(closed)"


def served_latencies(agent: AgentProcess, n: int = 40) -> list[float]:
    """``GET /v1/health`` on a fresh connection each time (as a new client would come), in seconds."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(agent.socket_path))
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        times.append(time.perf_counter() - start)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return times


def summary(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    return f"median {statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms over {len(ms)}"


def test_a_flood_from_a_uid_no_rule_admits_costs_others_nothing(token_env: TokenEnv, start_agent: Any) -> None:
    # The connection cap is small, so that if refused connections counted against it they would fill it.
    token_env.write_config(server="workers = 2\nmax_connections = 64\nidle_timeout = 15.0\n")
    agent: AgentProcess = start_agent(token_env)
    open_to_everyone(agent.socket_path)
    quiet = served_latencies(agent)
    with idle_connections_as_nobody(agent.socket_path, FLOOD, answered=FLOOD) as firsts:
        during = served_latencies(agent)
        # Every flooding connection was answered 403 at once, without having sent anything.
        assert all(f.startswith(b"HTTP/1.1 403") for f in firsts), set(firsts)
        assert all(b"may not use this agent" in f for f in firsts)
    print(f"\nadmitted caller, quiet: {summary(quiet)}; during a {FLOOD}-connection flood: {summary(during)}")
    assert "too_many_connections" not in agent.output()


ADMIT_NOBODY = f"""
[policy]
[[policy.rule]]
name = "nobody"
uids = [{NOBODY}]
"""


def test_a_flood_from_an_admitted_uid_is_bounded_per_uid(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(
        server="workers = 2\nmax_connections = 64\nmax_connections_per_uid = 16\nidle_timeout = 15.0\n",
        extra_top=ADMIT_NOBODY,
    )
    agent: AgentProcess = start_agent(token_env)
    open_to_everyone(agent.socket_path)
    with idle_connections_as_nobody(agent.socket_path, FLOOD, answered=FLOOD - 2 * 16) as firsts:
        # At most 16 per worker are served; the rest are turned away. One worker took at least half of the
        # flood, so at least 16 are served; fewer than 32 if the other took fewer than 16.
        served = [f for f in firsts if f.startswith(b"HTTP/1.1 200")]
        assert 16 <= len(served) <= 2 * 16, len(served)
        refused = [f for f in firsts if not f.startswith(b"HTTP/1.1 200")]
        assert all(f.startswith(b"HTTP/1.1 503") and b"too_many_connections" in f for f in refused), set(refused)
        during = served_latencies(agent)
    print(f"\nadmitted caller during a {FLOOD}-connection flood from another admitted uid: {summary(during)}")


EXE_RULE = f"""
[policy]
[[policy.rule]]
name = "sleepers"
uids = [{NOBODY}]
exes = ["{SLEEP}"]
"""

# Run as uid 65534: connect, fork; the parent execs /usr/bin/sleep (keeping the connection), the child waits
# until it has, says "ready", waits for "go" and sends a request on the inherited connection.
FORK_EXEC = r"""
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.set_inheritable(True)
parent = os.getpid()
if os.fork():
    os.execv(sys.argv[2], [sys.argv[2], "60"])
while os.readlink(f"/proc/{parent}/exe") != sys.argv[2]:
    time.sleep(0.01)
print("ready", parent, flush=True)
sys.stdin.readline()
s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
s.settimeout(20)
answer = b""
while chunk := s.recv(4096):
    answer += chunk
os.kill(parent, 9)
print(answer.decode("latin-1"), flush=True)
"""


def test_the_fork_exec_trick_does_not_borrow_an_admitted_executable(token_env: TokenEnv, start_agent: Any) -> None:
    if not os.path.exists(SYSTEM_PYTHON) or not os.path.exists(SLEEP):
        pytest.skip(f"{SYSTEM_PYTHON} and {SLEEP} are needed")
    token_env.write_config(extra_top=EXE_RULE)
    agent: AgentProcess = start_agent(token_env)
    open_to_everyone(agent.socket_path)
    # The agent is stopped while the trick connects and execs, so that when it accepts, the process that
    # connected already runs /usr/bin/sleep: the exe it reads is the admitted one. What must catch the trick
    # is that the bytes come from another process.
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        trick = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", FORK_EXEC, str(agent.socket_path), SLEEP],
            user=NOBODY,
            group=NOBODY,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert trick.stdout is not None and trick.stdin is not None
        ready = trick.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        assert os.readlink(f"/proc/{ready[1]}/exe") == SLEEP
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    trick.stdin.write("go\n")
    trick.stdin.flush()
    answer, _ = trick.communicate(timeout=30)
    assert answer.startswith("HTTP/1.1 403"), answer
    body = json.loads(answer.partition("\n\n")[2])  # (text mode: the CRLFs are newlines here)
    # Admitted at accept (the exe matched), refused for the bytes: not the plain "may not use this agent".
    assert body["error"]["code"] == "sender_changed", body
    wait_until(lambda: "carried bytes written by pid" in agent.output(), 10, "the refusal in the log")
    assert agent.http.get("/v1/health").status_code == 200


PYTHON_RULE = f"""
[policy]
[[policy.rule]]
name = "pythons"
uids = [{NOBODY}]
exes = ["{os.path.realpath(SYSTEM_PYTHON)}"]
"""

PLAIN_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
head = b"GET /v1/health HTTP/1.1\r\nHost: a\r\n"
s.sendall(head + b"\r\n" + head + b"\r\n" + head + b"\r\n" + head + b"Connection: close\r\n\r\n")
s.settimeout(20)
answer = b""
while chunk := s.recv(4096):
    answer += chunk
print(answer.decode("latin-1"))
"""


def test_the_admitted_executable_itself_is_served_on_a_checked_connection(
    token_env: TokenEnv, start_agent: Any
) -> None:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} is needed")
    token_env.write_config(extra_top=PYTHON_RULE)
    agent: AgentProcess = start_agent(token_env)
    open_to_everyone(agent.socket_path)
    out = run_as_nobody(PLAIN_CLIENT, str(agent.socket_path))
    assert out.count("HTTP/1.1 200") == 4, out
