"""The dev Dfns server's entry point (``agent.dev.dfns_server.run``) in its own process; the server itself
is tested in process in ``tests/unit/test_dev_dfns.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from agent.dev.dfns_server import ServiceAccount
from agent.dev.testing import ROOT, DfnsUser, new_key, pem


def test_run_writes_private_token_files_and_serves(tmp_path: Path) -> None:
    key = new_key("ed25519")
    key_file = tmp_path / "sa.pem"
    key_file.write_text(pem(key))
    tokens = tmp_path / "tokens"
    script = (
        "import sys\nfrom pathlib import Path\nfrom agent.dev.dfns_server import run\n"
        f"run('127.0.0.1', 0, [('ops', Path({str(key_file)!r}), 'Y2ktb3Bz')], Path({str(tokens)!r}), sys.stdout)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        url = first.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        token_file = tokens / "ops.token"
        assert second.strip() == f"ops: credId=Y2ktb3Bz token file={token_file}"
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        account = ServiceAccount("us-?", "ops", token, "Y2ktb3Bz", "cr-?")
        c = DfnsUser(url, account, key)
        try:
            assert c.call("POST", "/wallets", {"network": "Bitcoin"}).status_code == 200
        finally:
            c.http.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert token not in first + second + out + err
