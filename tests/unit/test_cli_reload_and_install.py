"""``dfns-agent reload`` and ``dfns-agent files install`` on input they must refuse and files they must not
write through or leave half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.cli.main import main
from agent.dev.testing import files_cannot_grow_past


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("pid", ["0", "-1", "-4242"])
def test_reload_refuses_a_pid_kill_would_read_as_a_group_or_everyone(monkeypatch: pytest.MonkeyPatch, pid: str) -> None:
    """kill(0, SIGHUP) hangs up the caller's own process group, kill(-1, …) every process it may signal."""
    signalled: list[tuple[int, int]] = []

    def kill(target: int, sig: int) -> None:
        signalled.append((target, sig))
        raise ProcessLookupError

    monkeypatch.setattr(os, "kill", kill)
    r = run("reload", "--pid", pid, "--timeout", "0.1")
    assert signalled == []
    assert r.exit_code == 2 and "--pid" in r.output


@pytest.mark.parametrize("timeout", ["nan", "inf", "0", "-1"])
def test_reload_refuses_a_timeout_that_is_no_wait(monkeypatch: pytest.MonkeyPatch, timeout: str) -> None:
    signalled: list[int] = []
    monkeypatch.setattr(os, "kill", lambda target, sig: signalled.append(target))
    r = run("reload", "--pid", str(2**22 + 1), "--timeout", timeout)
    assert signalled == [], "no SIGHUP is sent when its outcome cannot be waited for"
    assert r.exit_code == 2 and "--timeout" in r.output


def test_files_install_where_it_cannot_write_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run("files", "install", "--systemd-dir", str(blocker / "units"), "--config-dir", str(tmp_path / "cfg"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.startswith("dfns-agent: install_failed: cannot install "), r.output
    assert "Not a directory" in r.stderr


def test_files_install_does_not_write_through_a_link_at_the_target(tmp_path: Path) -> None:
    units, elsewhere = tmp_path / "units", tmp_path / "elsewhere"
    units.mkdir()
    (units / "dfns-agent.service").symlink_to(elsewhere)  # dangling: Path.exists() says False
    r = run("files", "install", "--systemd-dir", str(units), "--config-dir", str(tmp_path / "cfg"))
    assert r.exit_code == 0, r.output
    assert not elsewhere.exists(), "the unit was written through a link planted at its path"
    assert f"kept {units / 'dfns-agent.service'} (exists)" in r.stdout
    assert (units / "dfns-agent.socket").stat().st_mode & 0o777 == 0o644


def test_files_install_leaves_nothing_behind_when_a_write_fails(tmp_path: Path) -> None:
    """A full disk must not leave a truncated unit that the next run keeps as 'exists'."""
    units = tmp_path / "units"
    with files_cannot_grow_past(100):  # every shipped file is larger
        r = run("files", "install", "--systemd-dir", str(units), "--config-dir", str(tmp_path / "cfg"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.startswith("dfns-agent: install_failed: "), r.output
    assert [p.name for p in units.iterdir()] == []
    again = run("files", "install", "--systemd-dir", str(units), "--config-dir", str(tmp_path / "cfg"))
    assert again.exit_code == 0 and "kept" not in again.stdout, again.output
