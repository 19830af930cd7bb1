"""What a reload applies: ``as_reloaded`` keeps the sections only a restart can change, and names them."""

from __future__ import annotations

from pathlib import Path

from agent.config import (
    AuditConfig,
    Config,
    CredentialConfig,
    LoggingConfig,
    Rule,
    ServerConfig,
    TokenConfig,
    as_reloaded,
)

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
