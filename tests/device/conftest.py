"""Fixtures of the device tests: real SoftHSM tokens, real agent processes on real Unix sockets.

The helpers behind them are in ``agent/dev/testing.py``. A template token with one key of every supported
type is built once per test session; each test that needs a token gets a private copy of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import TokenConfig
from agent.dev.testing import (
    PIN,
    TOKEN_LABEL,
    AgentProcess,
    TokenEnv,
    agent_starter,
    make_token_env,
    shared_template_token,
    short_tempdir,
    softhsm_module,
    template_public_keys,
    wait_until,
)
from agent.secret import Secret
from agent.token import Token, unload_module


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
def token(token_env: TokenEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[Token]:
    """The test's own token opened in this process (``SOFTHSM2_CONF`` pointed at it), logged in. Closed, and
    the module unloaded, only once a recovery the test set off has ended: never under a thread inside it."""
    monkeypatch.setenv("SOFTHSM2_CONF", str(token_env.softhsm_conf))
    t = Token.open(TokenConfig(module=softhsm_module(), label=TOKEN_LABEL), Secret(PIN, "test"))
    try:
        yield t
    finally:
        wait_until(lambda: not t.circuit._recovering.locked(), 30, "recovery to end")
        t.close()
        unload_module(softhsm_module())


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
