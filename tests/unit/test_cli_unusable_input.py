"""The commands that talk to an agent (``sign``, ``request``, ``register``) and the agent's client, on input and
answers they cannot use: each is one line ``dfns-agent: CODE: MESSAGE`` with a sensible exit status, never a
traceback, and input that cannot be sent never reaches the socket.

A stand-in agent (``tests/unit/test_agent_client.py``'s server) counts what reaches it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.cli.main import main
from agent.client import INVALID_JSON, AgentClient, AgentClientError, encode_body
from agent.config import MAX_BODY_LIMIT
from tests.unit.test_agent_client import Handler, serving


def run(*args: str, stdin: str | bytes | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


def nothing_sent(handler: Handler, body: dict[str, object]) -> None:
    raise AssertionError(f"{handler.path} reached the agent")


def assert_input_error(r: Result, code: str, *words: str, exit_code: int = 2) -> None:
    """``exit_code``: 2 for ``--data`` (as for a usage error), 1 for ``sign``'s stdin (as it always was)."""
    assert r.exit_code == exit_code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    assert "Traceback" not in r.output
    assert r.stderr.startswith(f"dfns-agent: {code}: "), r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


# --- request --data ----------------------------------------------------------------------------------


def test_data_from_a_missing_file_is_an_input_error(short_dir: Path) -> None:
    r = run("request", "POST", "/wallets", "--data", f"@{short_dir / 'none.json'}", "--socket", str(short_dir / "s"))
    assert_input_error(r, "unreadable_file", "none.json", "No such file")


def test_data_from_a_directory_is_an_input_error(short_dir: Path) -> None:
    r = run("request", "POST", "/wallets", "--data", f"@{short_dir}", "--socket", str(short_dir / "s"))
    assert_input_error(r, "unreadable_file", "Is a directory")


def test_data_from_a_file_that_is_not_utf8_is_an_input_error(short_dir: Path) -> None:
    (short_dir / "bin").write_bytes(b'{"a": "\xff\xfe"}')
    r = run("request", "POST", "/wallets", "--data", f"@{short_dir / 'bin'}", "--socket", str(short_dir / "s"))
    assert_input_error(r, INVALID_JSON, "not UTF-8")


def test_data_at_sign_alone_names_no_file(short_dir: Path) -> None:
    assert_input_error(
        run("request", "POST", "/wallets", "--data", "@", "--socket", str(short_dir / "s")), "invalid_request"
    )


NOT_SENDABLE = {
    "NaN": "NaN",
    "Infinity": '{"amount": Infinity}',
    "beyond a double": '{"amount": 1e999}',
    "lone surrogate": '{"name": "\\ud800"}',
    "too deep": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("text", NOT_SENDABLE.values(), ids=NOT_SENDABLE.keys())
def test_data_that_cannot_be_sent_as_json_is_refused_before_the_agent(short_dir: Path, text: str) -> None:
    with serving(short_dir / "a.sock", nothing_sent) as server:
        r = run("request", "POST", "/wallets", "--data", text, "--socket", str(short_dir / "a.sock"))
    assert_input_error(r, INVALID_JSON, "--data")
    assert server.seen.requests == []


@pytest.mark.parametrize("text", NOT_SENDABLE.values(), ids=NOT_SENDABLE.keys())
def test_a_challenge_that_cannot_be_sent_as_json_is_refused_before_the_agent(short_dir: Path, text: str) -> None:
    with serving(short_dir / "a.sock", nothing_sent) as server:
        r = run("sign", "--socket", str(short_dir / "a.sock"), stdin=text)
    assert_input_error(r, INVALID_JSON, "stdin", exit_code=1)
    assert server.seen.requests == []


def test_a_challenge_that_is_not_utf8_is_an_input_error(short_dir: Path) -> None:
    assert_input_error(
        run("sign", "--socket", str(short_dir / "s"), stdin=b"\xff\xfe{}"), INVALID_JSON, "UTF-8", exit_code=1
    )


def test_data_from_stdin_that_is_not_utf8_is_an_input_error(short_dir: Path) -> None:
    r = run("request", "POST", "/wallets", "--data", "@-", "--socket", str(short_dir / "s"), stdin=b"\xff")
    assert_input_error(r, INVALID_JSON, "--data @-", "UTF-8")


def test_data_from_an_endless_file_is_refused_at_the_largest_body_any_agent_reads(short_dir: Path) -> None:
    with serving(short_dir / "a.sock", nothing_sent) as server:
        r = run("request", "POST", "/wallets", "--data", "@/dev/zero", "--socket", str(short_dir / "a.sock"))
    assert_input_error(r, "payload_too_large", "/dev/zero", str(MAX_BODY_LIMIT))
    assert server.seen.requests == []


def test_a_challenge_longer_than_any_agent_reads_is_refused(short_dir: Path) -> None:
    text = '{"challenge": "' + "a" * MAX_BODY_LIMIT + '"}'
    with serving(short_dir / "a.sock", nothing_sent) as server:
        r = run("sign", "--socket", str(short_dir / "a.sock"), stdin=text)
    assert_input_error(r, "payload_too_large", "stdin", exit_code=1)
    assert server.seen.requests == []


# --- the client --------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [math.nan, {"a": math.inf}, {"a": "\ud800"}, {"a": object()}], ids=repr)
def test_the_client_refuses_a_body_it_cannot_send_with_a_code_and_sends_nothing(short_dir: Path, body: object) -> None:
    with pytest.raises(AgentClientError) as info:
        encode_body(body)
    assert info.value.code == INVALID_JSON and info.value.status == 0
    with serving(short_dir / "a.sock", nothing_sent) as server, AgentClient(short_dir / "a.sock") as client:
        with pytest.raises(AgentClientError) as sent:
            client.request("POST", "/wallets", body)
    assert sent.value.code == INVALID_JSON
    assert server.seen.requests == [] and server.seen.connections == 0


def foreign_error(handler: Handler, body: dict[str, object]) -> None:
    handler.answer(503, {"error": "upstream is down"})  # JSON, but not the agent's error object


def test_an_error_answer_that_is_not_the_agents_shape_is_bad_response(short_dir: Path) -> None:
    with serving(short_dir / "a.sock", foreign_error), AgentClient(short_dir / "a.sock") as client:
        for call in (lambda: client.sign({"challenge": "c"}), client.health):
            with pytest.raises(AgentClientError) as info:
                call()
            assert (info.value.status, info.value.code) == (503, "bad_response")
            assert "upstream is down" in info.value.message


def test_status_against_something_that_is_not_the_agent_is_one_line(short_dir: Path) -> None:
    with serving(short_dir / "a.sock", foreign_error):
        r = run("status", "--socket", str(short_dir / "a.sock"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.startswith("dfns-agent: bad_response: "), r.output


# --- register ----------------------------------------------------------------------------------------

PENDING = {"id": "ap-1", "status": "Pending"}


def pending(handler: Handler, body: dict[str, object]) -> None:
    handler.answer(202, PENDING)  # Dfns's 202 to POST /auth/credentials, passed on by the agent


def test_a_registration_awaiting_approval_says_so(short_dir: Path) -> None:
    with serving(short_dir / "a.sock", pending):
        r = run("register", "--credential", "new", "--via", "old", "--socket", str(short_dir / "a.sock"))
    assert r.exit_code == 0, r.output
    assert '"status": "Pending"' in r.stdout
    assert "202" in r.stderr and "awaits policy approval" in r.stderr and "not active" in r.stderr


def test_the_client_gives_the_registrations_status(short_dir: Path) -> None:
    with serving(short_dir / "a.sock", pending), AgentClient(short_dir / "a.sock") as client:
        registered = client.credential_registration("new", via="old")
        assert (registered.status, registered.body, registered.pending) == (202, PENDING, True)
        assert client.register_credential("new", via="old") == PENDING
