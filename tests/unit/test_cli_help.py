"""The help a new user reads: every command and option described, defaults shown, nothing cut off, and the
README's and the setup script's instructions working as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agent.cli.main import main
from agent.cli.util import AUDIT_DEFAULT, SOCKET_DEFAULT
from agent.dev.testing import ROOT
from agent.paths import default_audit_path, default_socket_path


def commands(
    group: click.Group = main, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))


ALL = list(commands())


def help_of(*args: str) -> str:
    r = CliRunner().invoke(main, [*args, "--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    return r.output


def test_every_command_is_covered() -> None:
    names = {" ".join(path) for path, _ in ALL}
    assert {"serve", "sign", "keys generate", "keys public", "audit verify", "dev-dfns", "doctor"} <= names


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=lambda p: " ".join(p))
def test_every_option_is_described_and_accepts_config(path: tuple[str, ...]) -> None:
    command = dict(ALL)[path]
    options = [p for p in command.params if isinstance(p, click.Option)]
    undescribed = [o.opts[0] for o in options if not o.help]
    assert not undescribed, f"{' '.join(path)}: no help for {undescribed}"
    assert any("--config" in o.opts for o in options), f"{' '.join(path)} does not take --config"
    help_of(*path)


def test_top_level_and_group_listings_are_not_cut_off() -> None:
    for args in ((), ("keys",), ("audit",)):
        text = help_of(*args)
        listing = text.split("Commands:\n", 1)[1]
        assert "..." not in listing, listing
        for line in listing.splitlines():
            assert len(line) <= 80 and line.startswith("  "), line
        # One line per command: a short help that fits does not wrap.
        group = main if not args else main.commands[args[0]]
        assert isinstance(group, click.Group)
        assert len(listing.strip().splitlines()) == len(group.commands), listing


def test_every_socket_option_shows_its_default() -> None:
    with_socket = [path for path, c in ALL if any("--socket" in getattr(p, "opts", ()) for p in c.params)]
    assert {("serve",), ("sign",), ("status",), ("doctor",), ("request",), ("register",)} <= set(with_socket)
    for path in with_socket:
        flat = " ".join(help_of(*path).split())
        assert "[default: ([server] socket in the config, else $XDG_RUNTIME_DIR/dfns-agent/agent.sock" in flat, flat


def test_socket_default_text_follows_agent_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4321")
    assert default_socket_path() == Path("/run/user/4321/dfns-agent/agent.sock")
    assert "$XDG_RUNTIME_DIR/dfns-agent/agent.sock" in SOCKET_DEFAULT
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == Path(tempfile.gettempdir()) / f"dfns-agent-{os.geteuid()}" / "agent.sock"
    assert "${TMPDIR:-/tmp}/dfns-agent-$UID/agent.sock" in SOCKET_DEFAULT


def test_audit_default_text_follows_agent_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/state")
    assert default_audit_path() == Path("/state/dfns-agent/audit.jsonl")
    assert "${XDG_STATE_HOME:-~/.local/state}/dfns-agent/audit.jsonl" in AUDIT_DEFAULT
    assert "/var/lib/dfns-agent/audit.jsonl for root" in AUDIT_DEFAULT
    if os.geteuid() == 0:
        monkeypatch.delenv("XDG_STATE_HOME")
        assert default_audit_path() == Path("/var/lib/dfns-agent/audit.jsonl")


@pytest.mark.parametrize("path", [("serve",), ("audit",)])
def test_serve_and_audit_say_where_the_audit_log_is(path: tuple[str, ...]) -> None:
    flat = " ".join(help_of(*path).split())
    assert "/var/lib/dfns-agent/audit.jsonl" in flat and "${XDG_STATE_HOME:-~/.local/state}" in flat, flat


def test_audit_verify_says_what_it_cannot_detect() -> None:
    flat = " ".join(help_of("audit", "verify").split())
    assert "edited, inserted or deleted in the middle" in flat
    assert "cannot detect the last record altered, the last records cut off (truncation)" in flat, flat
    assert "whole chain rewritten" in flat


def test_keys_and_dev_dfns_options_are_described() -> None:
    assert "Key type: Ed25519" in help_of("keys", "generate")
    assert "Label of the key, as `keys list` shows it" in help_of("keys", "public")
    dev = " ".join(help_of("dev-dfns").split())
    assert "Address to listen on" in dev and "TCP port to listen on" in dev


def readme_socket_line() -> str:
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("S=")]
    assert len(lines) == 1, lines
    return lines[0].split("  #", 1)[0]


@pytest.mark.parametrize("runtime", ["/run/user/4321", "", None])
def test_readme_socket_line_is_the_default_socket(runtime: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    if runtime is not None:
        env["XDG_RUNTIME_DIR"] = runtime
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    else:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    r = subprocess.run(["sh", "-c", readme_socket_line() + '; printf %s "$S"'], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == str(default_socket_path()), (r.stdout, default_socket_path())


def test_readme_health_statuses_include_degraded() -> None:
    row = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| `GET /v1/health`"))
    assert re.search(r"`ok`.*`degraded`.*`down`", row), row


@pytest.fixture
def script_copy() -> Iterator[Path]:
    """softhsm_setup.sh alone in an empty directory: if it started the setup, it would fail or write here."""
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "softhsm_setup.sh"
        shutil.copy2(ROOT / "softhsm_setup.sh", copy)
        yield copy


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_setup_script_help_only_prints(script_copy: Path, flag: str) -> None:
    r = subprocess.run([str(script_copy), flag], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: ") and "dev-dfns" in r.stdout and "test" in r.stdout
    assert r.stderr == ""  # no "==> installing …"/"creating .venv"
    assert sorted(p.name for p in script_copy.parent.iterdir()) == ["softhsm_setup.sh"]


def test_setup_script_unknown_command_fails_before_any_work(script_copy: Path) -> None:
    r = subprocess.run([str(script_copy), "srve"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("usage: ") and r.stdout == ""
    assert sorted(p.name for p in script_copy.parent.iterdir()) == ["softhsm_setup.sh"]
