"""Error messages a new user meets: each says what is wrong and what to do next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.app.bodies import RegisterBody, SignBody
from agent.cli.main import main
from agent.client import AgentClient, AgentClientError
from agent.errors import BadRequest, ListenError, TokenUnavailable
from agent.token.module import load_module
from agent.transport.listener import bind_unix_socket


def test_a_missing_absolute_module_path_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(TokenUnavailable) as info:
        load_module(str(tmp_path / "libnothing.so"))
    assert info.value.message == f"PKCS#11 module {tmp_path / 'libnothing.so'} does not exist"


def test_a_relative_module_path_asks_for_an_absolute_one() -> None:
    with pytest.raises(TokenUnavailable) as info:
        load_module("libsofthsm2.so")
    assert "relative path" in info.value.message and "absolute path" in info.value.message


def test_a_module_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenUnavailable) as info:
        load_module(str(tmp_path))
    assert info.value.message == f"PKCS#11 module {tmp_path} is not a regular file"


SHAPE = '{"challenge": <the answer of POST /auth/action/init>, "credential"?: name}'


def _bad(parse: object, body: object) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse(json.dumps(body).encode())  # type: ignore[operator]
    return info.value


def test_sign_given_the_bare_challenge_says_how_to_wrap_it() -> None:
    """The CLI's input (the /auth/action/init answer) posted as is to /v1/sign."""
    bare = {"challenge": "Y2gtMTIz", "challengeIdentifier": "eyJ0", "allowCredentials": {"key": [{"id": "x"}]}}
    error = _bad(SignBody.parse, bare)
    assert error.code == "invalid_request"
    assert error.message.startswith("unknown field(s): allowCredentials, challengeIdentifier; the body is " + SHAPE)
    assert 'this looks like the /auth/action/init answer itself: send it as {"challenge": <it>}' in error.message


def test_sign_with_a_challenge_string_names_the_body_shape() -> None:
    error = _bad(SignBody.parse, {"challenge": "Y2gtMTIz"})
    assert error.code == "invalid_challenge"
    assert error.message == (
        f"challenge must be the JSON object /auth/action/init returned, not a string; the body is {SHAPE}"
    )


def test_sign_without_challenge_names_the_body_shape() -> None:
    error = _bad(SignBody.parse, {"credential": "treasury"})
    assert error.message == f"missing field(s): challenge; the body is {SHAPE}"


def test_register_errors_name_their_body_shape() -> None:
    error = _bad(RegisterBody.parse, {"challenge": {}})
    assert error.message.startswith(
        'missing field(s): credential; the body is {"challenge": <the answer of POST /auth/credentials/init>'
    )


def test_a_second_agent_on_a_socket_is_told_what_to_do(short_dir: Path) -> None:
    path = short_dir / "run" / "agent.sock"
    first = bind_unix_socket(path)
    try:
        with pytest.raises(ListenError) as info:
            bind_unix_socket(path)
    finally:
        first.close()
    message = info.value.message
    assert message.startswith(f"another agent is already listening on {path}: stop it first"), message
    assert f"dfns-agent status --socket {path}" in message and "another socket with --socket" in message


def test_an_unreachable_agent_is_told_how_to_start_it(short_dir: Path) -> None:
    with AgentClient(short_dir / "none.sock") as client, pytest.raises(AgentClientError) as info:
        client.health()
    assert info.value.code == "agent_unreachable"
    assert f"cannot reach the agent at {short_dir / 'none.sock'}" in info.value.message
    assert "start it with `dfns-agent serve`" in info.value.message and "--socket" in info.value.message


def test_cli_input_errors_have_the_agents_error_style(short_dir: Path) -> None:
    sock = str(short_dir / "none.sock")
    runner = CliRunner()
    not_json = runner.invoke(main, ["sign", "--socket", sock], input="not json")
    assert not_json.exit_code == 1
    assert not_json.stderr.startswith("dfns-agent: invalid_json: stdin is not JSON"), not_json.stderr
    bad_data = runner.invoke(main, ["request", "POST", "/wallets", "--data", "{", "--socket", sock])
    assert bad_data.exit_code == 2 and bad_data.stderr.startswith("dfns-agent: invalid_json: --data is not JSON")
    unreachable = runner.invoke(main, ["sign", "--socket", sock], input="{}")
    assert unreachable.stderr.startswith("dfns-agent: agent_unreachable: "), unreachable.stderr


def test_config_errors_have_the_same_style(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["--config", str(tmp_path / "none.toml"), "keys", "list"])
    assert r.exit_code == 2
    assert r.stderr.startswith(f"dfns-agent: config_error: cannot read configuration file {tmp_path / 'none.toml'}")


def test_config_is_accepted_after_the_command_too(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.toml")
    for args in (
        ["keys", "list", "--config", missing],
        ["keys", "--config", missing, "list"],
        ["serve", "--config", missing],
    ):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert "No such option" not in r.stderr and f"configuration file {missing}" in r.stderr, (args, r.stderr)
    # After the command it wins over the one before it (the doctor reads it without loading it first).
    doctor = CliRunner().invoke(main, ["--config", "/elsewhere.toml", "doctor", "--config", missing])
    assert f"cannot read configuration file {missing}" in doctor.stdout and "elsewhere" not in doctor.stdout
