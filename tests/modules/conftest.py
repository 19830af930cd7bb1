"""Fixtures of the module contract suite: one token per PKCS#11 module (``agent/dev/modules.py``), built
once per test session, and agents configured for it. A module whose packages are not installed is skipped
with the reason (``softhsm_setup.sh`` installs them all)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.dev import modules
from agent.dev.testing import AgentProcess, TokenEnv, agent_starter, short_tempdir

BACKENDS: dict[str, Callable[[Path], modules.Backend]] = {
    "softhsm": modules.softhsm_backend,
    "p11kit": modules.p11kit_backend,
    "opencryptoki": modules.opencryptoki_backend,
    "tpm2": modules.tpm2_backend,
}


@pytest.fixture(scope="session", params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[modules.Backend]:
    name: str = request.param
    reason = modules.unavailable(name)
    if reason is not None:
        print(f"\nSKIP module contract on {name}: {reason}")
        pytest.skip(reason)
    with short_tempdir() as d:  # backend sockets need short paths too
        b = BACKENDS[name](d / name)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def module_env(backend: modules.Backend, tmp_path: Path) -> TokenEnv:
    """An agent config for ``backend``'s token, one credential per key (named after its kind)."""
    pin_file = tmp_path / "pin"
    pin_file.write_text(backend.pin + "\n")
    pin_file.chmod(0o600)
    te = TokenEnv(
        dir=tmp_path,
        softhsm_conf=backend.directory / "softhsm2.conf",
        pin_file=pin_file,
        config=tmp_path / "agent.toml",
    )
    write_module_config(te, backend)
    return te


def write_module_config(te: TokenEnv, backend: modules.Backend, token_extra: str = "", server: str = "") -> None:
    creds = "".join(f'\n[[credential]]\nname = "{kind}"\nkey = "{label}"\n' for label, kind in backend.keys.items())
    section = backend.token_section(te.pin_file).replace("[token.module_env]", f"{token_extra}[token.module_env]")
    te.config.write_text(f'{section}[server]\n{server}\n[audit]\nfile = "{te.audit_file}"\n{creds}')
    te.credentials = {}


@pytest.fixture
def start_agent() -> Iterator[Callable[..., AgentProcess]]:
    with short_tempdir() as d, agent_starter(d) as start:
        yield start
