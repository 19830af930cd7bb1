"""The agent raises its soft open-files limit before it forks (``agent/daemon/limits.py``): under systemd's
default soft limit of 1024, turned-away connections lingering for their answer could use up a worker's
descriptors, and then its token's and audit log's opens failed for every caller."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agent.daemon.limits import OPEN_FILES
from agent.dev.testing import ROOT, AgentProcess, TokenEnv, wait_all_workers


@contextmanager
def soft_open_files(soft: int) -> Iterator[int]:
    """This process's soft limit lowered to ``soft`` (what children started meanwhile inherit); the hard limit."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield before[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits").read().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


def test_the_agent_and_its_workers_raise_a_soft_limit_of_1024(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(server="workers = 2\nsign_threads = 0\n")
    with soft_open_files(1024) as hard:
        agent: AgentProcess = start_agent(token_env, wait=False)
    agent.wait_ready()
    workers = wait_all_workers(agent, 2)
    want = min(OPEN_FILES, hard)
    assert want > 1024, f"this machine's hard limit ({hard}) leaves nothing to raise"
    for pid in (agent.proc.pid, *workers):
        assert open_files_limit(pid) == (want, hard), pid
    assert agent.post("/v1/sign", {}).status_code == 400  # and it serves


CHILD = """
import resource
from agent.daemon.limits import raise_open_files_limit
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))  # lowering the hard limit needs no privilege
assert raise_open_files_limit() == 512 and resource.getrlimit(resource.RLIMIT_NOFILE) == (512, 512)
resource.setrlimit(resource.RLIMIT_NOFILE, (400, 512))
assert raise_open_files_limit(want=300) == 400 and resource.getrlimit(resource.RLIMIT_NOFILE) == (400, 512)
print("ok")
"""


def test_the_limit_is_raised_to_the_hard_limit_at_most_and_never_lowered() -> None:
    # In a child: a lowered hard limit cannot be raised again without privilege.
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
