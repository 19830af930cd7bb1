"""bench.env.tree_cpu_seconds: the server-side CPU the benchmark divides by requests must keep the share of
a process that exited (a worker restarted mid-cell), not only what the living processes have used."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from bench.env import tree_cpu_seconds

BURN = 0.3  # CPU seconds the child uses before it exits

# Forks a child that uses BURN s of CPU and exits, reaps it, says so, then waits (using none) to be ended.
PARENT = textwrap.dedent(f"""
    import os, sys, time
    pid = os.fork()
    if pid == 0:
        while time.process_time() < {BURN}:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
    sys.stdin.read()
""")


def test_the_cpu_of_a_child_that_exited_is_counted() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            assert proc.stdout.readline() == "reaped\n"  # the child is gone: only its parent's cutime holds it
            assert tree_cpu_seconds(proc.pid) >= BURN - 0.02  # clock ticks are 10 ms
        finally:
            proc.stdin.close()
