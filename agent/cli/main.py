"""The ``dfns-agent`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from agent import __version__, logs
from agent.config import Config, load_config
from agent.errors import AgentError, ConfigError
from agent.token.device import KeyKind, Token


class _Context:
    def __init__(self, config_path: str | None, verbose: bool = False) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def open_token(self, *, rw: bool = False) -> Token:
        from agent.secret import read_pin

        cfg = self.config.token
        pin = read_pin(cfg)
        return Token.open(cfg, pin, rw=rw)


def _fail(e: AgentError) -> None:
    click.echo(f"dfns-agent: error: {e.message}", err=True)
    sys.exit(2 if isinstance(e, ConfigError) else 1)


class _Group(click.Group):
    """Turns the agent's own errors into one clear line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentError as e:
            _fail(e)


@click.group(cls=_Group)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Agent config (TOML). Default: $DFNS_AGENT_CONFIG, ~/.config/dfns-agent/agent.toml, "
    "/etc/dfns-agent/agent.toml.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(__version__, prog_name="dfns-agent")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Sign Dfns user-action challenges with keys that never leave a PKCS#11 token."""
    logs.configure(verbose)
    ctx.obj = _Context(config_path, verbose)


@main.command()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="Override the socket path.")
@click.pass_obj
def serve(obj: _Context, socket_path: str | None) -> None:
    """Run the agent: log in to the token once and serve signing requests on the Unix socket."""
    from agent.daemon import run as daemon

    config = obj.config
    logs.configure(obj.verbose, fmt=config.logging.format, level=config.logging.level)
    daemon.run(config, socket_override=socket_path)


@main.group()
def keys() -> None:
    """Generate and inspect keys on the token (talks to the token directly, not to a running agent)."""


@keys.command("generate")
@click.option("--type", "kind", required=True, type=click.Choice([k.value for k in KeyKind]))
@click.option("--label", required=True, help="Label of the new key pair (must not exist yet).")
@click.pass_obj
def keys_generate(obj: _Context, kind: str, label: str) -> None:
    """Generate a key pair on the device; the private key is sensitive, non-extractable, sign-only."""
    with obj.open_token(rw=True) as token:
        info = token.generate(KeyKind(kind), label)
    click.echo(f"generated {info.type_name} key {info.label!r} id {info.id.hex()} {info.fingerprint}")
    click.echo(info.public_pem, nl=False)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def keys_list(obj: _Context, as_json: bool) -> None:
    """List private keys: label, id, type, SPKI SHA-256 fingerprint, sensitive/extractable flags."""
    with obj.open_token() as token:
        found = [k.describe() for k in token.keys()]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no private keys on the token")
        return
    header = ("LABEL", "ID", "TYPE", "FINGERPRINT", "SENSITIVE", "EXTRACTABLE")
    rows = [
        (k["label"], k["id"], k["type"], k["fingerprint"] or "-", _yes(k["sensitive"]), _yes(k["extractable"]))
        for k in found
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@keys.command("public")
@click.option("--label", required=True)
@click.option("--id", "key_id", help="CKA_ID in hex, when several keys share the label.")
@click.pass_obj
def keys_public(obj: _Context, label: str, key_id: str | None) -> None:
    """Print a key's public key as SubjectPublicKeyInfo PEM (what Dfns wants for service accounts)."""
    try:
        id_bytes = bytes.fromhex(key_id) if key_id else None
    except ValueError:
        raise click.BadParameter("must be hex", param_hint="--id") from None
    with obj.open_token() as token:
        info = token.find_key(label, id_bytes)
    click.echo(info.public_pem, nl=False)


@main.command()
@click.option("--credential", help="Credential name; default: the first one the challenge allows.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="Agent socket path.")
@click.pass_obj
def sign(obj: _Context, credential: str | None, socket_path: str | None) -> None:
    """Read an /auth/action/init challenge (JSON) on stdin, print the firstFactor JSON from the agent."""
    from agent.client import AgentClient, AgentClientError

    try:
        challenge = json.load(sys.stdin)
    except ValueError as e:
        raise click.ClickException(f"stdin is not JSON: {e}") from None
    with AgentClient(_client_socket(obj, socket_path)) as client:
        try:
            result = client.sign(challenge, credential)
        except AgentClientError as e:
            click.echo(f"dfns-agent: {e.code}: {e.message}", err=True)
            sys.exit(1)
    click.echo(json.dumps(result))


def _read_data(data: str | None) -> Any:
    """``--data``: inline JSON, ``@file`` or ``@-`` for stdin."""
    if data is None:
        return None
    if data.startswith("@"):
        source = data[1:]
        text = sys.stdin.read() if source == "-" else Path(source).read_text("utf-8")
    else:
        text = data
    try:
        return json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="--data") from None


@main.command()
@click.argument("method")
@click.argument("path")
@click.option("--data", help="JSON body: inline, @file, or @- for stdin. Default for mutations: {}.")
@click.option("--credential", help="Credential (and so Dfns identity) to use; default: the first with Dfns settings.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="Agent socket path.")
@click.pass_obj
def request(
    obj: _Context, method: str, path: str, data: str | None, credential: str | None, socket_path: str | None
) -> None:
    """Make a Dfns API call through the agent (user action signed on the token when it mutates).

    Prints Dfns's answer on stdout. Exit status 0 for 2xx (a 202 "pending approval" is noted on stderr),
    1 when Dfns or the agent refused.
    """
    from agent.client import AgentClient, AgentClientError

    body = _read_data(data)
    with AgentClient(_client_socket(obj, socket_path)) as client:
        try:
            answer = client.request(method.upper(), path, body, credential=credential)
        except AgentClientError as e:
            click.echo(f"dfns-agent: {e.code}: {e.message}", err=True)
            sys.exit(1)
    click.echo(answer.content.decode("utf-8", "replace"))
    if answer.status == 202:
        click.echo("dfns-agent: Dfns answered 202: the request awaits policy approval", err=True)
    if answer.status >= 300:
        click.echo(f"dfns-agent: Dfns answered {answer.status}", err=True)
        sys.exit(1)


@main.command()
@click.option("--credential", required=True, help="Credential whose (new) key to register with Dfns.")
@click.option("--via", help="Existing credential that signs the user action; default: the first with Dfns settings.")
@click.option("--name", "credential_name", help="Name of the credential at Dfns; default: the credential's name.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="Agent socket path.")
@click.pass_obj
def register(
    obj: _Context, credential: str, via: str | None, credential_name: str | None, socket_path: str | None
) -> None:
    """Register a key on the token as a new Dfns Key credential (key rotation).

    Drives /auth/credentials/init → key.create signed by the new key → POST /auth/credentials, the last
    step user-action signed by the existing credential VIA. Prints Dfns's answer.
    """
    from agent.client import AgentClient, AgentClientError

    with AgentClient(_client_socket(obj, socket_path)) as client:
        try:
            result = client.register_credential(credential, via=via, credential_name=credential_name)
        except AgentClientError as e:
            click.echo(f"dfns-agent: {e.code}: {e.message}", err=True)
            sys.exit(1)
    click.echo(json.dumps(result, indent=2))


@main.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    help="Check this socket path instead of the configured one.",
)
@click.pass_obj
def doctor(obj: _Context, socket_path: str | None) -> None:
    """Check module, token, PIN, keys, socket, config and Dfns; print a fix for every problem. Exit 0 if all pass."""
    from agent.diagnostics.doctor import run_doctor

    # config_path, not obj.config: a config that does not load is the doctor's first finding, not an error.
    sys.exit(0 if run_doctor(obj.config_path, sys.stdout, socket_override=socket_path) else 1)


@main.command()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="Agent socket path.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_obj
def status(obj: _Context, socket_path: str | None, as_json: bool) -> None:
    """Ask a running agent for its health, credentials, uptime and signatures served. Exit 1 unless ok."""
    from prometheus_client.parser import text_string_to_metric_families

    from agent.client import AgentClient, AgentClientError

    with AgentClient(_client_socket(obj, socket_path)) as client:
        try:
            health = client.health()
            creds = client.credentials()
            text = client.metrics()
        except AgentClientError as e:
            click.echo(f"dfns-agent: {e.code}: {e.message}", err=True)
            sys.exit(1)
    served: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dfns_agent_signatures_total":
                outcome = sample.labels["outcome"]
                served[outcome] = served.get(outcome, 0) + int(sample.value)
    report = {"socket": str(client.socket_path), "health": health, "credentials": creds, "signatures": served}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        token = health["token"]
        click.echo(
            f"agent at {client.socket_path}: {health['status']}"
            + (f" ({health['reason']})" if health.get("reason") else "")
        )
        click.echo(
            f"  token {token['label']!r} serial {token['serial']} ({token['manufacturer']} {token['model']}), "
            f"logged in: {_yes(token['loggedIn'])}, reconnects: {token['reconnects']}"
        )
        click.echo(
            f"  uptime {health['uptimeSeconds']:.0f} s; signatures: {served.get('ok', 0)} ok, "
            f"{served.get('refused', 0)} refused, {served.get('error', 0)} failed"
        )
        for c in creds:
            ok = health["keys"].get(c["name"])
            click.echo(
                f"  {'✓' if ok else '✗'} {c['name']}: {c['keyType']} key {c['keyLabel']!r}, credId {c['credId']}"
            )
    if health["status"] != "ok":
        sys.exit(1)


@main.group()
def audit() -> None:
    """Work with the agent's tamper-evident audit log."""


@audit.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def audit_verify(file: str) -> None:
    """Check the hash chain of an audit log; report the first broken record. Exit 1 if broken."""
    from agent.core.audit import verify

    result = verify(Path(file))
    if result.ok:
        click.echo(f"ok: {result.records} record(s), chain intact")
        return
    click.echo(f"BROKEN at line {result.first_bad_line}: {result.reason} ({result.records} record(s) before it)")
    sys.exit(1)


@main.command("dev-dfns")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8400, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--service-account",
    "accounts",
    multiple=True,
    metavar="NAME=PEMFILE",
    help="Create a service account for this public key (repeatable). Its credId is the agent's default for "
    "that key, so a credential without cred_id matches it.",
)
@click.option("--tokens-dir", required=True, type=click.Path(file_okay=False), help="Where NAME.token files go (0600).")
def dev_dfns(host: str, port: int, accounts: tuple[str, ...], tokens_dir: str) -> None:
    """Run a local Dfns-compatible API for trying the agent without a Dfns account (state in memory).

    It verifies signatures the way Dfns does, makes challenges and user actions single-use, and binds user
    actions to method, path and payload. Not for production.
    """
    from cryptography.hazmat.primitives import serialization

    from agent.dev.dfns_server import run
    from agent.dfns.protocol import cred_id_for_key

    parsed: list[tuple[str, Path, str | None]] = []
    for spec in accounts:
        name, sep, pem_file = spec.partition("=")
        if not sep or not name or not pem_file:
            raise click.BadParameter(f"{spec!r} is not NAME=PEMFILE", param_hint="--service-account")
        pem = Path(pem_file).read_bytes()
        spki = serialization.load_pem_public_key(pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        parsed.append((name, Path(pem_file), cred_id_for_key(spki)))
    run(host, port, parsed, Path(tokens_dir), sys.stdout)


def _client_socket(obj: _Context, explicit: str | None) -> Path:
    from agent.paths import socket_path_for

    if explicit:
        return Path(explicit)
    from agent.config import find_config

    try:
        find_config(obj.config_path)
    except ConfigError:
        return socket_path_for(None)  # no config file anywhere: the default socket path
    return socket_path_for(obj.config)
