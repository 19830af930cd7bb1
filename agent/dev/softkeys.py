"""A software :class:`agent.core.keystore.KeyStore`: a test double for the token.

The signing service, the Dfns flow and the routes only need what the ``KeyStore`` protocol says, so the
unit tests run them in-process against ``cryptography`` keys in milliseconds, without SoftHSM; the SoftHSM
end-to-end tests (``tests/device/``) check the real token. Keys of every :class:`agent.token.keys.KeyKind`
live under labels, come back as real :class:`agent.token.keys.KeyInfo` values and sign in the encodings
Dfns expects (Ed25519 raw 64 bytes, ECDSA DER over SHA-256, RSA PKCS#1 v1.5 over SHA-256), as the token
does. Faults a test needs are one call away: :meth:`SoftKeyStore.fail_next_sign`, :meth:`~SoftKeyStore.remove`
(a key gone), :meth:`~SoftKeyStore.replace` (another key under the same label), :meth:`~SoftKeyStore.set_state`.

Never for production: the private keys are ordinary objects in this process's memory.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.errors import AgentError, CircuitOpen, TokenUnavailable, UnsupportedKey
from agent.health import TokenHealth, TokenIdentity, TokenState
from agent.token.keys import KeyInfo, KeyKind, ambiguous_label, no_such_key

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_IDENTITY = TokenIdentity(
    label="soft", serial="50F7000000000001", manufacturer="dfns-agent", model="SoftKeyStore"
)


def generate(kind: KeyKind) -> PrivateKey:
    """A new private key of ``kind``."""
    if kind is KeyKind.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if kind is KeyKind.P256:
        return ec.generate_private_key(ec.SECP256R1())
    if kind is KeyKind.SECP256K1:
        return ec.generate_private_key(ec.SECP256K1())
    if kind is KeyKind.RSA2048:
        return rsa.generate_private_key(65537, 2048)
    return rsa.generate_private_key(65537, 3072)


@cache
def shared_key(kind: KeyKind, index: int = 0) -> PrivateKey:
    """One private key per ``(kind, index)`` for the whole process: RSA-3072 takes a good fraction of a
    second to generate, and most tests do not care whose key it is, only that it signs."""
    return generate(kind)


def kind_of(key: PrivateKey) -> KeyKind:
    """The :class:`KeyKind` of a private key, else :class:`UnsupportedKey`."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return KeyKind.ED25519
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyKind.P256
        if isinstance(key.curve, ec.SECP256K1):
            return KeyKind.SECP256K1
        raise UnsupportedKey(f"curve {key.curve.name} is not one Dfns accepts")
    if key.key_size == 2048:
        return KeyKind.RSA2048
    if key.key_size == 3072:
        return KeyKind.RSA3072
    raise UnsupportedKey(f"rsa{key.key_size} is not a size the agent supports")


def sign_dfns(key: PrivateKey, message: bytes) -> bytes:
    """``message`` signed in the encoding Dfns verifies (``dfns-protocol.md`` §3)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


@dataclass
class _Entry:
    private: PrivateKey
    info: KeyInfo
    gone: bool = False


class SoftKeyStore:
    """Private keys under labels, answering as the token does (see the module docstring).

    Thread-safe, so a service with a thread pool can use it. ``signatures`` counts the signatures made
    and ``sign_threads`` names the thread each was made on (to tell a thread pool from the event loop).
    """

    def __init__(self, identity: TokenIdentity = DEFAULT_IDENTITY) -> None:
        self._identity = identity
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._faults: list[AgentError] = []
        self._state = TokenState.OK
        self._reason: str | None = None
        self._logged_in = True
        self.reconnects = 0
        self.signatures = 0
        self.sign_threads: list[str] = []
        self._hold: threading.Event | None = None

    @classmethod
    def with_keys(cls, labels: Iterable[tuple[str, KeyKind]], *, fresh: bool = False) -> SoftKeyStore:
        """A store with one key per ``(label, kind)``; shared process-wide keys unless ``fresh``."""
        store = cls()
        used: dict[KeyKind, int] = {}
        for label, kind in labels:
            index = used[kind] = used.get(kind, -1) + 1
            store.add(label, generate(kind) if fresh else shared_key(kind, index))
        return store

    # -- the KeyStore protocol -----------------------------------------------------------------------

    @property
    def identity(self) -> TokenIdentity:
        return self._identity

    @property
    def name(self) -> str:
        return f"soft key store {self._identity.label!r}"

    def find_key(self, label: str, key_id: bytes | None = None) -> KeyInfo:
        """The one present key with this label (and id), as :meth:`agent.token.Token.find_key` answers."""
        with self._lock:
            self._require_up()
            found = [e for e in self._entries if not e.gone and e.info.label == label]
            if key_id:
                found = [e for e in found if e.info.id == key_id]
        if not found:
            raise no_such_key(label, key_id, self.name)
        if len(found) > 1:
            raise ambiguous_label(label, [e.info.id for e in found])
        return found[0].info

    def sign(self, key: KeyInfo, message: bytes) -> bytes:
        """Sign with the private key behind ``key``; injected faults and a down store raise first."""
        with self._lock:
            if self._state is not TokenState.OK:
                raise CircuitOpen(f"{self.name} is unavailable: {self._reason or self._state.value}")
            if self._faults:
                raise self._faults.pop(0)
            entry = next((e for e in self._entries if not e.gone and e.info == key), None)
            if entry is None:
                raise TokenUnavailable(f"{self.name} could not sign with {key.label!r}: the key is gone")
            self.signatures += 1
            self.sign_threads.append(threading.current_thread().name)
            private = entry.private
        if self._hold is not None:
            self._hold.wait()
        return sign_dfns(private, message)

    def health(self) -> TokenHealth:
        if self._hold is not None:
            self._hold.wait()
        with self._lock:
            up = self._state is TokenState.OK
            return TokenHealth(self._state, up, up and self._logged_in, self.reconnects, self._reason)

    # -- setting up and breaking it ------------------------------------------------------------------

    def add(self, label: str, key: PrivateKey | KeyKind, key_id: bytes | None = None) -> KeyInfo:
        """Store ``key`` (or a new key of that kind) under ``label``; the id defaults to 8 bytes derived from
        the public key, so it is stable for a key, as a token's CKA_ID is."""
        private = generate(key) if isinstance(key, KeyKind) else key
        kind = kind_of(private)
        public = private.public_key()
        if key_id is None:
            spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            key_id = hashlib.sha256(spki).digest()[:8]
        info = KeyInfo(label=label, id=key_id, kind=kind, type_name=kind.value, public_key=public)
        with self._lock:
            self._entries.append(_Entry(private, info))
        return info

    def private_key(self, label: str) -> PrivateKey:
        """The present private key under ``label`` (to check signatures against it independently)."""
        with self._lock:
            entry = next((e for e in self._entries if not e.gone and e.info.label == label), None)
        if entry is None:
            raise no_such_key(label, None, self.name)
        return entry.private

    def remove(self, label: str) -> None:
        """The key under ``label`` is gone (deleted from the device): find_key and sign fail for it."""
        with self._lock:
            for e in self._entries:
                if e.info.label == label:
                    e.gone = True

    def replace(self, label: str, key: PrivateKey | KeyKind | None = None) -> KeyInfo:
        """Another key under the same label and id: the credential's key has changed."""
        with self._lock:
            old = next(e for e in self._entries if not e.gone and e.info.label == label)
        kind = old.info.kind
        assert kind is not None
        self.remove(label)
        return self.add(label, key if key is not None else kind, old.info.id)

    def fault(self, reason: str) -> None:
        """As the token's circuit opening: ``degraded`` with ``reason``."""
        self.set_state(TokenState.DEGRADED, reason)

    def hold_signatures(self) -> threading.Event:
        """Signatures and health checks block (as on a hung HSM) until the returned event is set."""
        self._hold = threading.Event()
        return self._hold

    def fail_next_sign(self, error: AgentError | None = None, times: int = 1) -> None:
        """The next ``times`` signatures raise ``error`` (default: :class:`TokenUnavailable`)."""
        with self._lock:
            for _ in range(times):
                self._faults.append(error or TokenUnavailable(f"{self.name} could not sign: injected fault"))

    def set_state(self, state: TokenState, reason: str | None = None, *, logged_in: bool = True) -> None:
        """Report ``state`` (with ``reason``) from :meth:`health`; while not ``ok``, signing fails fast with
        :class:`CircuitOpen` and :meth:`find_key` with :class:`TokenUnavailable`, as the token's circuit does."""
        with self._lock:
            self._state, self._reason, self._logged_in = state, reason, logged_in

    def _require_up(self) -> None:
        if self._state is not TokenState.OK:
            raise TokenUnavailable(f"{self.name} is unavailable: {self._reason or self._state.value}")
