"""``dfns-agent keys``: generate and inspect keys on the token, directly (no running agent involved)."""

from __future__ import annotations

import json

import click

from agent.cli.util import Context, yes
from agent.token import KeyKind


@click.group()
def keys() -> None:
    """Generate and inspect keys on the token.

    Talks to the token directly (the config's [token]), not to a running agent.
    """


# Choice matches enum names; not case-sensitive, KeyKind's names read as its values (P256 -> p256).
@keys.command("generate")
@click.option(
    "--type",
    "kind",
    required=True,
    type=click.Choice(KeyKind, case_sensitive=False),
    help="Key type: Ed25519, ECDSA on P-256 or secp256k1, or RSA with a 2048- or 3072-bit modulus.",
)
@click.option("--label", required=True, help="Label of the new key pair (must not exist yet).")
@click.pass_obj
def generate(obj: Context, kind: KeyKind, label: str) -> None:
    """Generate a key pair on the token.

    The private key is sensitive, non-extractable and sign-only; it never leaves the device.
    """
    with obj.open_token(rw=True) as token:
        info = token.generate(kind, label)
    click.echo(f"generated {info.type_name} key {info.label!r} id {info.id.hex()} {info.fingerprint}")
    click.echo(info.public_pem, nl=False)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def list_keys(obj: Context, as_json: bool) -> None:
    """List the private keys on the token.

    Label, id, type, SPKI SHA-256 fingerprint, and the sensitive/extractable flags.
    """
    with obj.open_token() as token:
        found = token.keys()
    if as_json:
        click.echo(json.dumps([k.to_json() for k in found], indent=2))
        return
    if not found:
        click.echo("no private keys on the token")
        return
    header: tuple[str, ...] = ("LABEL", "ID", "TYPE", "FINGERPRINT", "SENSITIVE", "EXTRACTABLE")
    rows: list[tuple[str, ...]] = [
        (
            # Any tool may label a key: one with control characters (a terminal escape) is shown quoted and escaped.
            k.label if k.label.isprintable() else repr(k.label),
            k.id.hex(),
            k.type_name,
            k.fingerprint if k.public_key is not None else "-",
            yes(k.sensitive),
            yes(k.extractable),
        )
        for k in found
    ]
    if any(k.other_usages for k in found):  # keys that can do more than sign: shown, and refused by serve
        header = (*header, "ALSO ALLOWS")
        rows = [(*r, ",".join(k.other_usages) or "-") for r, k in zip(rows, found, strict=True)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


@keys.command("public")
@click.option("--label", required=True, help="Label of the key, as `keys list` shows it.")
@click.option("--id", "key_id", help="CKA_ID in hex, when several keys share the label.")
@click.pass_obj
def public(obj: Context, label: str, key_id: str | None) -> None:
    """Print a key's public key (SPKI PEM).

    SubjectPublicKeyInfo PEM: what Dfns asks for when creating a service account.
    """
    try:
        id_bytes = bytes.fromhex(key_id) if key_id is not None else None
    except ValueError:
        raise click.BadParameter("must be hex", param_hint="--id") from None
    if id_bytes == b"":  # an empty id would quietly mean "any id", the opposite of what --id asks
        raise click.BadParameter("must be at least one byte of hex (e.g. 01)", param_hint="--id")
    with obj.open_token() as token:
        info = token.find_key(label, id_bytes)
    click.echo(info.public_pem, nl=False)
