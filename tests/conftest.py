"""Fixtures for the two test files still at this level (``test_cli.py`` and ``test_doctor.py``).

The tests live in ``tests/unit/`` (no SoftHSM, no processes) and ``tests/device/`` (SoftHSM tokens and
agent processes), each with its own ``conftest.py``; the helpers are in ``agent/dev/testing.py``. This file
re-exports the helpers the two files above still import ``from conftest``, and must import without SoftHSM
because it also sits above ``tests/unit/``: ``MODULE`` is looked up only when it is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.dev.softhsm import find_softhsm_module, write_softhsm_conf
from agent.dev.testing import (
    KINDS,
    PIN,
    ROOT,
    SO_PIN,
    SPARE_KEY,
    TOKEN_LABEL,
    AgentProcess,
    SdkWorld,
    TokenEnv,
    agent_starter,
    b64url,
    b64url_decode,
    check_assertion,
    connect_raw,
    cred_id_for,
    key_label,
    make_challenge,
    make_token_env,
    run_cli,
    running_agent,
    sdk_world,
    shared_template_token,
    short_tempdir,
    softhsm_module,
    template_public_keys,
    verify_signature,
    wait_until,
)

__all__ = [
    "KINDS",
    "PIN",
    "ROOT",
    "SO_PIN",
    "SPARE_KEY",
    "TOKEN_LABEL",
    "AgentProcess",
    "SdkWorld",
    "TokenEnv",
    "b64url",
    "b64url_decode",
    "check_assertion",
    "connect_raw",
    "cred_id_for",
    "find_softhsm_module",
    "key_label",
    "make_challenge",
    "make_token_env",
    "run_cli",
    "running_agent",
    "sdk_world",
    "softhsm_module",
    "verify_signature",
    "wait_until",
    "write_softhsm_conf",
]


def __getattr__(name: str) -> str:
    if name == "MODULE":  # `from conftest import MODULE`: SoftHSM's module, or the old error if it is missing
        return softhsm_module()
    raise AttributeError(name)


@pytest.fixture(scope="session")
def template_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_template_token(lambda: tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="session")
def template_keys(template_token: Path) -> dict[str, str]:
    """Public key PEM of every key on the template token (and so on every copy), by label."""
    return template_public_keys(template_token)


@pytest.fixture
def token_env(template_token: Path, tmp_path: Path) -> TokenEnv:
    return make_token_env(template_token, tmp_path / "hsm")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is limited to 107 bytes; pytest's tmp paths are long)."""
    with short_tempdir() as d:
        yield d


@pytest.fixture
def start_agent(short_dir: Path) -> Iterator[Callable[..., AgentProcess]]:
    """``start_agent(te, wait=True, socket_path=None)``; every agent must end cleanly without printing the PIN."""
    with agent_starter(short_dir) as start:
        yield start


@pytest.fixture
def agent(token_env: TokenEnv, start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return start_agent(token_env)
