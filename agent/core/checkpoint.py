"""Signed checkpoints of the audit chain, as C2SP ``tlog-checkpoint`` signed notes.

A checkpoint is the note text ``<origin>\\n<tree size>\\n<base64 head hash>\\n``, a blank line and one
signature line ``— <key name> <base64(key ID || signature)>`` (https://c2sp.org/signed-note,
https://c2sp.org/tlog-checkpoint). The key name is the origin. The tree size is the ``seq`` of the last
record covered; where a transparency log puts its Merkle root hash this log puts the SHA-256 of that
record's line, the head of a hash *chain* (not a Merkle tree: there are no inclusion or consistency proofs,
a verifier re-reads the records). Signature types: Ed25519 (``0x01``, key ID over the 32-byte key) and
ECDSA P-256 over SHA-256 (``0x02``, DER signature, key ID over the SPKI DER), as the signed-note spec
assigns them. The private key stays on the token (the agent signs with it like with any credential key).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.config import AuditConfig
from agent.core.keystore import KeyStore
from agent.errors import ConfigError, UnsupportedKey
from agent.token.keys import KeyInfo, KeyKind

EM_DASH = "\u2014"
ED25519_TYPE = 0x01
ECDSA_TYPE = 0x02
LOG_PREFIX = "audit checkpoint "  # how a checkpoint appears in the agent's log (followed by a JSON string)
_ORIGIN_RE = re.compile(r"^[^\s+]+$")

VerifyKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def valid_origin(origin: str) -> bool:
    """A note key name: non-empty, no spaces, no ``+`` (the origin doubles as the key name)."""
    return bool(_ORIGIN_RE.match(origin)) and all(ord(c) >= 0x20 for c in origin)


def key_id(name: str, public_key: VerifyKey) -> bytes:
    """The signed-note key ID: 4 bytes of SHA-256(name || 0x0A || type || public key encoding)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519_TYPE]) + raw).digest()[:4]
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()[:4]  # the witness ECDSA type hashes the SPKI DER alone


def note_text(origin: str, size: int, head: str) -> str:
    """The checkpoint's signed text; ``head`` is the hex SHA-256 of record ``size``'s line."""
    return f"{origin}\n{size}\n{base64.b64encode(bytes.fromhex(head)).decode()}\n"


@dataclass(frozen=True)
class Checkpoint:
    """A parsed checkpoint note (its signatures not yet verified)."""

    origin: str
    size: int
    head: str  # hex
    text: str  # the signed note text
    signatures: tuple[tuple[str, bytes], ...]  # (key name, key ID || signature)
    note: str  # the whole note as written

    def verify(self, name: str, public_key: VerifyKey) -> bool:
        """True if a signature line of key ``name`` with the matching key ID verifies; False if none does."""
        kid = key_id(name, public_key)
        for signer, blob in self.signatures:
            if signer != name or blob[:4] != kid:
                continue  # an unknown key: ignored, as the spec says
            try:
                if isinstance(public_key, ed25519.Ed25519PublicKey):
                    public_key.verify(blob[4:], self.text.encode())
                else:
                    public_key.verify(blob[4:], self.text.encode(), ec.ECDSA(hashes.SHA256()))
                return True
            except InvalidSignature:
                return False
        return False


def parse(note: str) -> Checkpoint:
    """Parse a checkpoint note; raises ValueError when it is not one."""
    if not note.endswith("\n") or "\n\n" not in note:
        raise ValueError("not a signed note (no blank line before the signatures)")
    split = note.rindex("\n\n")
    text, sigs = note[: split + 1], note[split + 2 :]
    lines = text.split("\n")[:-1]
    if len(lines) < 3 or not all(lines):
        raise ValueError("a checkpoint's text has at least three non-empty lines")
    origin, size_text, head_b64 = lines[0], lines[1], lines[2]
    if not re.fullmatch(r"0|[1-9][0-9]*", size_text):
        raise ValueError(f"tree size {size_text!r} is not a decimal number")
    try:
        head = base64.b64decode(head_b64, validate=True)
    except ValueError:
        raise ValueError("the head hash is not base64") from None
    if len(head) != 32:
        raise ValueError("the head hash is not 32 bytes")
    signatures = []
    for line in sigs.split("\n")[:-1]:
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != EM_DASH:
            raise ValueError(f"not a signature line: {line!r}")
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            raise ValueError("a signature is not base64") from None
        if len(blob) < 5:
            raise ValueError("a signature is too short")
        signatures.append((parts[1], blob))
    if not signatures:
        raise ValueError("a signed note has at least one signature")
    return Checkpoint(origin, int(size_text), head.hex(), text, tuple(signatures), note)


def find_in_text(text: str) -> Iterator[Checkpoint]:
    """Checkpoints in a file an operator hands ``audit verify``: the agent's log lines (``audit checkpoint
    "<note>"``, e.g. from ``journalctl -o cat``, in text or JSON log format), JSON audit records holding
    one, or bare notes one after another. Anything else is skipped."""
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                note = doc.get("checkpoint")
                message = doc.get("message")
                if not isinstance(note, str) and isinstance(message, str) and message.startswith(LOG_PREFIX):
                    line = message  # the agent's JSON log format: the log line is the message
                elif isinstance(note, str):
                    with contextlib.suppress(ValueError):
                        yield parse(note)
                    continue
        at = line.find(LOG_PREFIX + '"')
        if at >= 0:
            with contextlib.suppress(ValueError):
                yield parse(json.JSONDecoder().raw_decode(line, at + len(LOG_PREFIX))[0])
    # Bare notes: text lines, a blank line, signature lines.
    for match in re.finditer(r"(?m)^(?:[^\n{—]+\n){3,}\n(?:— [^\n]+\n)+", text):
        with contextlib.suppress(ValueError):
            yield parse(match.group(0))


def load_public_key(pem: bytes) -> VerifyKey:
    key = serialization.load_pem_public_key(pem)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise UnsupportedKey("a checkpoint key is Ed25519 or ECDSA P-256")


class NoteSigner:
    """Signs checkpoints with a key on the token (non-extractable; the agent only asks it to sign)."""

    def __init__(self, keys: KeyStore, key: KeyInfo, origin: str) -> None:
        if key.kind not in (KeyKind.ED25519, KeyKind.P256) or key.public_key is None:
            raise UnsupportedKey(
                f"the audit checkpoint key {key.label!r} must be Ed25519 or P-256, not {key.type_name}"
            )
        if key.extractable or not key.sensitive:
            raise UnsupportedKey(f"the audit checkpoint key {key.label!r} is extractable or not sensitive")
        if not key.signs:
            raise UnsupportedKey(f"the audit checkpoint key {key.label!r} does not allow signing (CKA_SIGN is false)")
        if not valid_origin(origin):
            raise UnsupportedKey(f"checkpoint origin {origin!r} must be non-empty, without spaces or '+'")
        self._keys, self._key, self.origin = keys, key, origin
        public = key.public_key
        assert isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
        self.public_key: VerifyKey = public
        self._key_id = key_id(origin, public)

    @property
    def public_pem(self) -> str:
        return self._key.public_pem

    @property
    def fingerprint(self) -> str:
        return self._key.fingerprint

    def sign(self, size: int, head: str) -> str:
        """The whole note for the chain's head ``(size, head)``."""
        text = note_text(self.origin, size, head)
        signature = self._keys.sign(self._key, text.encode())
        blob = base64.b64encode(self._key_id + signature).decode()
        return f"{text}\n{EM_DASH} {self.origin} {blob}\n"


def log_line(note: str) -> str:
    """The note as one log line (so journald and log shippers keep it whole)."""
    return LOG_PREFIX + json.dumps(note, ensure_ascii=False)


def newest(checkpoints: Iterable[Checkpoint]) -> Checkpoint | None:
    return max(checkpoints, key=lambda c: c.size, default=None)


def default_origin() -> str:
    return f"{socket.gethostname() or 'localhost'}/dfns-agent/audit"


def signer_for(audit: AuditConfig, keys: KeyStore, credential_keys: Iterable[str]) -> NoteSigner | None:
    """The checkpoint signer ``[audit] checkpoint_key`` names, or None when none is set. The key must be
    a dedicated one: a credential's key would sign audit notes with a key that also signs for Dfns."""
    if audit.checkpoint_key is None:
        return None
    if audit.checkpoint_key in set(credential_keys):
        raise ConfigError(f"[audit] checkpoint_key {audit.checkpoint_key!r} is a credential's key; use a dedicated key")
    return NoteSigner(keys, keys.find_key(audit.checkpoint_key), audit.checkpoint_origin or default_origin())
