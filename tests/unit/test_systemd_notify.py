"""systemd integration in process: the notify protocol and the watchdog settings, with the test playing
systemd's receiving end (socket activation and the agent started the way systemd starts it, which need
child processes, are in ``tests/device/test_systemd.py``)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.dev.testing import Notifications
from agent.transport import systemd


@pytest.fixture
def notify_socket(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Notifications]:
    n = Notifications(str(short_dir / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "notify"))
    yield n
    n.close()


def test_notify_without_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False and systemd.watchdog() is False


def test_notify_sends_one_datagram_to_a_path(notify_socket: Notifications) -> None:
    assert systemd.ready("serving 5 credential(s)")
    assert systemd.reloading()
    assert systemd.stopping()
    assert systemd.watchdog()
    got = [notify_socket.receive(1.0) for _ in range(4)]
    lines = [m[1] for m in got if m]
    assert len(lines) == 4
    reloading = lines.pop(1)
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].partition("=")[2]) > 0
    assert lines == [["READY=1", "STATUS=serving 5 credential(s)"], ["STOPPING=1"], ["WATCHDOG=1"]]
    assert all(m and m[0] == os.getpid() for m in got)
    assert systemd.ready()
    assert notify_socket.receive(1.0) == (os.getpid(), ["READY=1"])


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dfns-agent-test-{secrets.token_hex(6)}"
    n = Notifications(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1", "STATUS=abstract")
        assert n.receive(1.0) == (os.getpid(), ["READY=1", "STATUS=abstract"])
    finally:
        n.close()


def test_reloading_carries_the_monotonic_clock(notify_socket: Notifications) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = notify_socket.receive(1.0)
    assert got is not None
    lines = got[1]
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].split("=", 1)[1]) <= after


def test_notify_failures_are_reported_not_raised(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False
    assert "not a path or an abstract socket" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("1000000", "self", 0.5),
        ("1000000", "1", None),  # meant for another process (we inherited the environment)
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: Any) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert systemd.watchdog_interval() == expected


def test_unset_environment_silences_a_forked_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    systemd.unset_environment()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert systemd.notify("READY=1") is False and systemd.watchdog_interval() is None


def test_no_socket_activation_without_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd.listen_socket() is None
