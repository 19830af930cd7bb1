"""What a reload applies: ``as_reloaded`` keeps the sections only a restart can change, and names them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.config import (
    AuditConfig,
    Config,
    CredentialConfig,
    LoggingConfig,
    Rule,
    ServerConfig,
    TokenConfig,
    as_reloaded,
    config_from_text,
    load_config,
)
from agent.daemon import reload_status
from agent.errors import ConfigError

RUNNING = Config(
    token=TokenConfig(module="/usr/lib/a.so", label="a"),
    server=ServerConfig(workers=2),
    credentials=(CredentialConfig(name="one", key="key-one"),),
    audit=AuditConfig(file=Path("/var/lib/a/audit.jsonl")),
    logging=LoggingConfig(),
    path=Path("/etc/a.toml"),
)


def test_credentials_and_policy_are_applied_and_nothing_is_named() -> None:
    fresh = Config(
        token=RUNNING.token,
        server=RUNNING.server,
        credentials=(CredentialConfig(name="two", key="key-two"),),
        rules=(Rule(name="r", uids=frozenset({0})),),
        audit=RUNNING.audit,
        logging=RUNNING.logging,
        path=RUNNING.path,
    )
    kept, changed = as_reloaded(RUNNING, fresh)
    assert kept == fresh and changed == ()


def test_what_only_a_restart_changes_is_kept_and_named() -> None:
    fresh = Config(
        token=TokenConfig(module="/usr/lib/b.so", label="b"),
        server=ServerConfig(workers=4),
        credentials=(CredentialConfig(name="two", key="key-two"),),
        audit=AuditConfig(file=Path("/elsewhere/audit.jsonl"), refusal_interval=5.0),
        logging=LoggingConfig(format="json"),
        path=RUNNING.path,
    )
    kept, changed = as_reloaded(RUNNING, fresh)
    assert changed == ("token", "server", "audit", "logging")
    assert (kept.token, kept.server, kept.audit, kept.logging) == (
        RUNNING.token,
        RUNNING.server,
        RUNNING.audit,
        RUNNING.logging,
    )
    assert kept.credentials == fresh.credentials


TEXT = b"""\
[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "a"
[token.pin]
file = "pin"
[[credential]]
name = "one"
key = "key-one"
"""


def test_the_staged_text_is_read_as_the_config_file_it_came_from(tmp_path: Path) -> None:
    """Workers parse the text the supervisor read: relative paths resolve next to the original file."""
    cfg = config_from_text(TEXT, tmp_path / "etc" / "agent.toml")
    assert cfg.path == tmp_path / "etc" / "agent.toml"
    assert cfg.token.pin.file == tmp_path / "etc" / "pin"
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        config_from_text(b"[token", tmp_path / "agent.toml")


def test_the_staged_text_is_private_and_goes_with_the_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    reload_status.stage(4242, 7, TEXT)
    path = reload_status.staged_path(4242)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert reload_status.read_staged(4242) == (7, TEXT)
    reload_status.remove(4242)  # at the agent's exit
    assert not path.exists()
    with pytest.raises(OSError):
        reload_status.read_staged(4242)


def test_a_relative_module_path_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_bytes(TEXT.replace(b"/usr/lib/softhsm/libsofthsm2.so", b"libsofthsm2.so"))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "'libsofthsm2.so' is a relative path" in info.value.message and "absolute path" in info.value.message
