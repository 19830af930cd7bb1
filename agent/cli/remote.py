"""Commands that talk to a running agent over its socket: ``sign``, ``request``, ``register``, ``status``.

Their client errors (the agent refused, or is not there) are printed by the group in
``agent/cli/main.py``, not here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

import click

from agent.cli.util import CliError, Context, socket_option, yes
from agent.client import INVALID_JSON, AgentClientError, encode_body
from agent.config import MAX_BODY_LIMIT


@click.command()
@click.option("--credential", help="Credential name; default: the first one the challenge allows.")
@socket_option()
@click.pass_obj
def sign(obj: Context, credential: str | None, socket_path: str | None) -> None:
    """Sign an /auth/action/init challenge read on stdin.

    Reads the challenge (JSON, as /auth/action/init returned it) on stdin and prints the firstFactor JSON
    the running agent returns.
    """
    # exit 1 for sign's stdin, 2 for request's --data: both as they were (tests/unit/test_messages.py holds them)
    challenge = _parse_json(
        _read_stdin("stdin", exit_code=1), "stdin", "; give the /auth/action/init answer", exit_code=1
    )
    with obj.client(socket_path) as client:
        result = client.sign(challenge, credential)
    click.echo(json.dumps(result))


def _parse_json(text: str, where: str, hint: str = "", *, exit_code: int = 2) -> Any:
    """``text`` as JSON the agent can be sent, or an input error (``exit_code``): besides text
    that is not JSON, NaN/Infinity (not JSON, though Python reads them), a number beyond a double, a lone
    surrogate and nesting too deep to read are all refused here, with the same code, before anything is sent."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
        encode_body(value)
    except RecursionError:
        raise CliError(
            INVALID_JSON, f"{where} is nested too deeply to be JSON the agent reads{hint}", exit_code=exit_code
        ) from None
    except ValueError as e:
        raise CliError(INVALID_JSON, f"{where} is not JSON ({e}){hint}", exit_code=exit_code) from None
    except AgentClientError as e:
        raise CliError(INVALID_JSON, f"{where}: {e.message}{hint}", exit_code=exit_code) from None
    return value


def _read_bounded(stream: BinaryIO, where: str, exit_code: int) -> bytes:
    """At most what an agent reads: a body longer than the largest ``max_body_bytes`` (or an endless
    source such as ``@/dev/zero``) is an input error, not a CLI that reads until memory runs out."""
    data = stream.read(MAX_BODY_LIMIT + 1)
    if len(data) > MAX_BODY_LIMIT:
        raise CliError(
            "payload_too_large", f"{where} is longer than {MAX_BODY_LIMIT} bytes, more than any agent reads",
            exit_code=exit_code,
        )  # fmt: skip
    return data


def _read_stdin(where: str, *, exit_code: int = 2) -> str:
    """All of stdin as UTF-8 text; bytes that are not UTF-8 are an input error, not a UnicodeDecodeError."""
    data = _read_bounded(sys.stdin.buffer, where, exit_code)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(
            INVALID_JSON, f"{where} is not UTF-8 text ({e.reason} at byte {e.start})", exit_code=exit_code
        ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _read_data(data: str | None) -> Any:
    """``--data``: inline JSON, ``@file`` or ``@-`` for stdin."""
    if data is None:
        return None
    if not data.startswith("@"):
        return _parse_json(data, "--data")
    source = data[1:]
    if not source:
        raise CliError("invalid_request", "--data @ names no file: give @FILE, or @- for stdin", exit_code=2)
    if source == "-":
        return _parse_json(_read_stdin("--data @-"), "--data @- (stdin)")
    try:
        with Path(source).open("rb") as f:
            text = _read_bounded(f, f"--data {data}", 2).decode("utf-8")
    except OSError as e:
        raise CliError(
            "unreadable_file", f"--data {data}: cannot read {source}: {e.strerror or e}", exit_code=2
        ) from None
    except UnicodeDecodeError as e:
        raise CliError(
            INVALID_JSON, f"--data {data}: {source} is not UTF-8 text ({e.reason} at byte {e.start})", exit_code=2
        ) from None
    return _parse_json(text, f"--data {data}")


@click.command()
@click.argument("method")
@click.argument("path")
@click.option("--data", help="JSON body: inline, @file, or @- for stdin. Default for mutations: {}.")
@click.option("--credential", help="Credential (and so Dfns identity) to use; default: the first with Dfns settings.")
@socket_option()
@click.pass_obj
def request(
    obj: Context, method: str, path: str, data: str | None, credential: str | None, socket_path: str | None
) -> None:
    """Make a Dfns API call through the agent.

    A call that mutates gets a user action signed on the token. Prints Dfns's answer on stdout. Exit
    status 0 for 2xx (a 202 "pending approval" is noted on stderr), 1 when Dfns or the agent refused.
    """
    body = _read_data(data)
    with obj.client(socket_path) as client:
        answer = client.request(method.upper(), path, body, credential=credential)
    click.echo(answer.content.decode("utf-8", "replace"))
    if answer.status == 202:
        click.echo("dfns-agent: Dfns answered 202: the request awaits policy approval", err=True)
    if answer.status >= 300:
        click.echo(f"dfns-agent: Dfns answered {answer.status}", err=True)
        sys.exit(1)


@click.command()
@click.option("--credential", required=True, help="Credential whose (new) key to register with Dfns.")
@click.option("--via", help="Existing credential that signs the user action; default: the first with Dfns settings.")
@click.option("--name", "credential_name", help="Name of the credential at Dfns; default: the credential's name.")
@socket_option()
@click.pass_obj
def register(
    obj: Context, credential: str, via: str | None, credential_name: str | None, socket_path: str | None
) -> None:
    """Register a token key as a new Dfns credential (rotation).

    Drives /auth/credentials/init → key.create signed by the new key → POST /auth/credentials, the last
    step user-action signed by the existing credential VIA. Prints Dfns's answer.
    """
    with obj.client(socket_path) as client:
        registered = client.credential_registration(credential, via=via, credential_name=credential_name)
    click.echo(json.dumps(registered.body, indent=2))
    if registered.pending:  # not yet a credential: deactivating the one in use now would lock the account out
        click.echo(
            "dfns-agent: Dfns answered 202: the registration awaits policy approval; the new credential is not "
            "active until it is approved, so keep the one in use until then",
            err=True,
        )


@click.command()
@socket_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_obj
def status(obj: Context, socket_path: str | None, as_json: bool) -> None:
    """Show a running agent's health and credentials.

    Health, credentials, uptime and signatures served; exit 1 unless the agent is ok.
    """
    with obj.client(socket_path) as client:
        health = client.health()
        creds = client.credentials()
        served = _signatures_served(client.metrics())
    if as_json:
        report = {
            "socket": str(client.socket_path),
            "health": health.to_json(),
            "credentials": creds,
            "signatures": served,
        }
        click.echo(json.dumps(report, indent=2))
    else:
        token, identity = health.token, health.identity
        reason = f" ({health.reason})" if health.reason else ""
        click.echo(f"agent at {client.socket_path}: {health.status.value}{reason}")
        click.echo(
            f"  token {identity.label!r} serial {identity.serial} ({identity.manufacturer} {identity.model}), "
            f"logged in: {yes(token.logged_in)}, reconnects: {token.reconnects}"
        )
        click.echo(
            f"  uptime {health.uptime_seconds:.0f} s; signatures: {served.get('ok', 0)} ok, "
            f"{served.get('refused', 0)} refused, {served.get('error', 0)} failed"
        )
        for c in creds:
            mark = "✓" if health.keys.get(c["name"]) else "✗"
            click.echo(f"  {mark} {c['name']}: {c['keyType']} key {c['keyLabel']!r}, credId {c['credId']}")
    if not health.ok:
        sys.exit(1)


def _signatures_served(metrics_text: str) -> dict[str, int]:
    """``dfns_agent_signatures_total`` summed by outcome over every worker process."""
    from prometheus_client.parser import text_string_to_metric_families

    served: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "dfns_agent_signatures_total":
                outcome = sample.labels["outcome"]
                served[outcome] = served.get(outcome, 0) + int(sample.value)
    return served
