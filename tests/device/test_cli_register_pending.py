"""``dfns-agent register`` end to end (real agent, local Dfns): a registration Dfns holds for policy approval
(202) must not read as done, or the operator goes on to deactivate the credential still in use (README,
"Rotating a key", step 4) while the new one is not active."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from agent.dev.dfns_server import DevDfns, DevDfnsServer
from agent.dev.testing import (
    PIN,
    SPARE_KEY,
    AgentProcess,
    TokenEnv,
    cred_id_for,
    key_label,
    run_cli,
)


@pytest.fixture
def world(
    token_env: TokenEnv, template_keys: dict[str, str], start_agent: Callable[..., AgentProcess]
) -> Iterator[tuple[DevDfns, AgentProcess]]:
    dfns = DevDfns()
    server = DevDfnsServer(dfns)
    base_url = server.start()
    try:
        sa = dfns.create_service_account("sa", template_keys[key_label("ed25519")], cred_id=cred_id_for("ed25519"))
        token_file = token_env.dir / "dfns.token"
        token_file.write_text(sa.token)
        token_file.chmod(0o600)
        section = f'[credential.dfns]\nbase_url = "{base_url}"\ntoken_file = "{token_file}"\n'
        text = token_env.config.read_text()
        text = text.replace(
            f'name = "ed25519"\nkey = "{key_label("ed25519")}"\ncred_id = "{cred_id_for("ed25519")}"\n',
            f'name = "ed25519"\nkey = "{key_label("ed25519")}"\ncred_id = "{cred_id_for("ed25519")}"\n{section}',
        )
        token_env.config.write_text(text + f'\n[[credential]]\nname = "spare"\nkey = "{SPARE_KEY}"\n{section}')
        yield dfns, start_agent(token_env)
    finally:
        server.stop()


def register(agent: AgentProcess) -> tuple[int, str, str]:
    te = agent.token_env
    r = run_cli(te, "register", "--credential", "spare", "--via", "ed25519", "--socket", str(agent.socket_path))
    assert PIN not in r.stdout + r.stderr
    return r.returncode, r.stdout, r.stderr


def test_a_registration_awaiting_approval_is_named_on_stderr(world: tuple[DevDfns, AgentProcess]) -> None:
    dfns, agent = world
    dfns.inject_fault("/auth/credentials", method="POST", status=202, body={"id": "ap-1", "status": "Pending"})
    status, out, err = register(agent)
    assert status == 0, err
    assert '"status": "Pending"' in out
    assert "Dfns answered 202" in err and "awaits policy approval" in err


def test_a_registration_done_says_nothing_more(world: tuple[DevDfns, AgentProcess]) -> None:
    _, agent = world
    status, out, err = register(agent)
    assert status == 0, err
    assert '"credentialId"' in out and "202" not in err
