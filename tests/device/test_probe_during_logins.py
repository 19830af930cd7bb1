"""SoftHSM rewrites token.object on every C_Login; another process reading the token meanwhile can get
NoSuchToken or GeneralError. A worker's probe that trips over a login elsewhere (a worker starting, the
doctor, ``dfns-agent keys``) must not count as a token fault: no circuit opened, no reconnect, health ok.

Real SoftHSM, real agent processes: logins from another process in a loop, and workers killed so the
supervisor starts new ones (each logs in), while every worker probes twice a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

from agent.dev.testing import PIN, TOKEN_LABEL, TokenEnv, softhsm_module, wait_all_workers, wait_until

LOGINS = textwrap.dedent(
    """
    import sys, time, pkcs11
    lib = pkcs11.lib(sys.argv[1])
    token = lib.get_token(token_label=sys.argv[2])
    end = time.monotonic() + float(sys.argv[4])
    n = 0
    failed = 0
    while time.monotonic() < end:
        try:
            with token.open(user_pin=sys.argv[3]):
                n += 1
        except pkcs11.exceptions.GeneralError:
            failed += 1  # this loop's own login collided with a worker's
        time.sleep(0.01)
    print(n, failed)
    """
)


def test_logins_elsewhere_while_workers_probe_are_not_token_faults(token_env: TokenEnv, start_agent: Any) -> None:
    token_env.write_config(server="workers = 3\n")
    token_env.config.write_text(token_env.config.read_text().replace("[token]\n", "[token]\nprobe_interval = 0.5\n", 1))
    agent = start_agent(token_env)
    workers = wait_all_workers(agent, 3)
    env = {**os.environ, "SOFTHSM2_CONF": str(token_env.softhsm_conf)}
    logins = subprocess.Popen(
        [sys.executable, "-c", LOGINS, softhsm_module(), TOKEN_LABEL, PIN, "8"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    for n, victim in enumerate(sorted(workers)[:2], 1):  # new workers log in while the others probe
        time.sleep(2.0)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda n=n: agent.proc.poll() is not None or agent.output().count("restarted (pid") >= n,
            30,
            "the supervisor to replace the worker",
        )
        assert agent.proc.poll() is None, agent.output()[-3000:]
    out, _ = logins.communicate(timeout=60)
    assert logins.returncode == 0
    time.sleep(1.0)  # two more probes of every worker after the last login
    text = agent.output()
    retried = text.count("probing again")
    looked = text.count("looking again")
    print(
        f"logins elsewhere (ok, failed): {out.strip()}; {retried} probe(s) and {looked} token lookup(s) saw a "
        "transient fault and tried again"
    )
    assert agent.proc.poll() is None, text[-3000:]
    assert "recovering" not in text and "reconnected" not in text, text[-3000:]
    assert agent.http.get("/v1/health").json()["status"] == "ok"
