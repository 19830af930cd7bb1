"""PKCS#11 token access: load the module safely, log in once, sign on the device.

Design (see ``shared/reference/pkcs11-softhsm.md``):

- python-pkcs11 calls ``C_Initialize(NULL)``; SoftHSM then turns its mutexes into no-ops while
  python-pkcs11 releases the GIL around every call, so two signing threads corrupt its heap. Right after
  loading we redo ``C_Finalize`` + ``C_Initialize({flags=CKF_OS_LOCKING_OK})`` through the module's own
  function list, before any session exists.
- One logged-in *anchor* session lives as long as the process: closing the last session (or calling
  python-pkcs11's ``Session.close()`` on the logged-in one) logs the whole token out.
- Each signing thread gets its own unauthenticated *worker* session (PKCS#11 forbids concurrent use of
  one session); the anchor's login makes private keys usable on all of them.
- Signatures come back in the standard encodings that ``cryptography`` verifies and Dfns expects:
  Ed25519 raw 64 bytes, ECDSA DER ``SEQUENCE{r, s}`` over SHA-256, RSA PKCS#1 v1.5 over SHA-256.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11

from agent.config import TokenConfig
from agent.errors import (
    CircuitOpen,
    IdentityMismatch,
    KeyExists,
    KeyNotFound,
    PinLocked,
    PinRejected,
    TokenError,
    TokenUnavailable,
    UnsupportedKey,
)
from agent.secret import Secret

log = logging.getLogger(__name__)

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyKind(str, Enum):
    """The key types Dfns accepts for Key credentials."""

    ED25519 = "ed25519"
    P256 = "p256"
    SECP256K1 = "secp256k1"
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"


# DER-encoded CKA_EC_PARAMS (namedCurve OIDs), and the PrintableString form some modules use for Ed25519.
_ED25519_OID = bytes.fromhex("06032b6570")
_ED25519_NAME = b"\x13\x0cedwards25519"
_EC_PARAMS = {
    KeyKind.P256: bytes.fromhex("06082a8648ce3d030107"),
    KeyKind.SECP256K1: bytes.fromhex("06052b8104000a"),
}
_EC_CURVES: dict[KeyKind, ec.EllipticCurve] = {KeyKind.P256: ec.SECP256R1(), KeyKind.SECP256K1: ec.SECP256K1()}
_RSA_BITS = {KeyKind.RSA2048: 2048, KeyKind.RSA3072: 3072}

# Private keys sign and do nothing else; they never leave the token.
PRIVATE_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
PUBLIC_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
}


def describe(exc: BaseException) -> str:
    """A short name for a PKCS#11 error (python-pkcs11's messages are usually empty)."""
    if isinstance(exc, p11.NoSuchKey):
        return "NoSuchKey: the key is no longer on the token"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Module loading with CKF_OS_LOCKING_OK


class _CK_C_INITIALIZE_ARGS(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _CK_SESSION_INFO(ctypes.Structure):
    _fields_ = [
        ("slotID", ctypes.c_ulong),
        ("state", ctypes.c_ulong),
        ("flags", ctypes.c_ulong),
        ("ulDeviceError", ctypes.c_ulong),
    ]


class _CK_FUNCTION_LIST_HEAD(ctypes.Structure):
    # CK_VERSION then the first 16 entry points, in the order fixed by the PKCS#11 standard.
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [(f"f{i}", ctypes.c_void_p) for i in range(16)]


_CKF_OS_LOCKING_OK = 0x2
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
_USER_STATES = {1, 3}  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS
_RV = ctypes.c_ulong
_InitFn = ctypes.CFUNCTYPE(_RV, ctypes.c_void_p)
_SessionInfoFn = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong, ctypes.POINTER(_CK_SESSION_INFO))


class _RawModule:
    """The few entry points python-pkcs11 does not expose, reached through ``C_GetFunctionList``."""

    def __init__(self, path: str) -> None:
        self._dll = ctypes.CDLL(path)  # same dlopen handle python-pkcs11 holds
        head = ctypes.POINTER(_CK_FUNCTION_LIST_HEAD)()
        get_list = self._dll.C_GetFunctionList
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CK_FUNCTION_LIST_HEAD))]
        get_list.restype = _RV
        rv = get_list(ctypes.byref(head))
        if rv != 0:
            raise TokenUnavailable(f"C_GetFunctionList of {path} failed (CKR 0x{rv:x})")
        fl = head.contents
        self.initialize = _InitFn(fl.f0)
        self.finalize = _InitFn(fl.f1)
        self.get_session_info = _SessionInfoFn(fl.f15)

    def reinitialize_with_locking(self) -> None:
        rv = self.finalize(None)
        if rv != 0:
            raise TokenUnavailable(f"C_Finalize failed while enabling OS locking (CKR 0x{rv:x})")
        args = _CK_C_INITIALIZE_ARGS(None, None, None, None, _CKF_OS_LOCKING_OK, None)
        rv = self.initialize(ctypes.byref(args))
        if rv not in (0, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise TokenUnavailable(f"C_Initialize with CKF_OS_LOCKING_OK failed (CKR 0x{rv:x})")

    def session_state(self, handle: int) -> int:
        info = _CK_SESSION_INFO()
        rv = self.get_session_info(handle, ctypes.byref(info))
        if rv != 0:
            raise TokenUnavailable(f"C_GetSessionInfo failed (CKR 0x{rv:x})")
        return int(info.state)


_modules: dict[str, tuple[Any, _RawModule]] = {}
_modules_lock = threading.Lock()


def load_module(path: str) -> tuple[Any, _RawModule]:
    """Load a PKCS#11 module once per process, initialized for multi-threaded use."""
    with _modules_lock:
        if path in _modules:
            return _modules[path]
        if not os.path.isabs(path) or not os.path.isfile(path):
            raise TokenUnavailable(f"PKCS#11 module {path!r} is not an existing file (give an absolute path)")
        try:
            lib = pkcs11.lib(path)
        except p11.PKCS11Error as e:
            raise TokenUnavailable(f"cannot load PKCS#11 module {path}: {describe(e)}") from None
        raw = _RawModule(path)
        raw.reinitialize_with_locking()
        _modules[path] = (lib, raw)
        return lib, raw


def unload_module(path: str) -> None:
    with _modules_lock:
        if _modules.pop(path, None) is not None:
            pkcs11.unload(path)


# --------------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class KeyInfo:
    """A private key on the token and its public half, as the agent needs to know it."""

    label: str
    id: bytes
    kind: KeyKind | None
    type_name: str
    public_key: PublicKey | None = field(repr=False, compare=False)
    sensitive: bool = True
    extractable: bool = False
    always_sensitive: bool = True
    never_extractable: bool = True

    @cached_property
    def spki_der(self) -> bytes:
        if self.public_key is None:
            raise UnsupportedKey(f"no public key found for key {self.label!r}")
        return self.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    @cached_property
    def public_pem(self) -> str:
        if self.public_key is None:
            raise UnsupportedKey(f"no public key found for key {self.label!r}")
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    @cached_property
    def fingerprint(self) -> str:
        """``sha256:`` + hex SHA-256 of the SubjectPublicKeyInfo DER."""
        return "sha256:" + hashlib.sha256(self.spki_der).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "id": self.id.hex(),
            "type": self.type_name,
            "fingerprint": self.fingerprint if self.public_key is not None else None,
            "sensitive": self.sensitive,
            "extractable": self.extractable,
            "always_sensitive": self.always_sensitive,
            "never_extractable": self.never_extractable,
        }


def _der_octets(raw: bytes, size: int) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING per the standard; some modules return the bare point."""
    if len(raw) == size:
        return raw
    if len(raw) >= 2 and raw[0] == 0x04:
        if raw[1] < 0x80 and raw[1] == len(raw) - 2:
            return raw[2:]
        if raw[1] == 0x81 and len(raw) > 3 and raw[2] == len(raw) - 3:
            return raw[3:]
    raise UnsupportedKey(f"unexpected CKA_EC_POINT encoding ({len(raw)} bytes)")


def _attr(obj: Any, attribute: Attribute, default: Any = None) -> Any:
    try:
        return obj[attribute]
    except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
        return default


def _classify(priv: Any) -> tuple[KeyKind | None, str]:
    key_type = _attr(priv, Attribute.KEY_TYPE)
    if key_type == KeyType.EC_EDWARDS:
        params = _attr(priv, Attribute.EC_PARAMS, b"")
        if params in (_ED25519_OID, _ED25519_NAME):
            return KeyKind.ED25519, KeyKind.ED25519.value
        return None, "eddsa (unsupported curve)"
    if key_type == KeyType.EC:
        params = _attr(priv, Attribute.EC_PARAMS, b"")
        for kind, der in _EC_PARAMS.items():
            if params == der:
                return kind, kind.value
        return None, "ec (unsupported curve)"
    if key_type == KeyType.RSA:
        modulus = _attr(priv, Attribute.MODULUS, b"")
        bits = len(modulus) * 8
        for kind, want in _RSA_BITS.items():
            if bits == want:
                return kind, kind.value
        return None, f"rsa{bits} (unsupported size)"
    return None, f"key type {key_type} (unsupported)"


def _public_key(session: Any, priv: Any, kind: KeyKind | None) -> PublicKey | None:
    if kind in _RSA_BITS:
        n = int.from_bytes(priv[Attribute.MODULUS], "big")
        e = int.from_bytes(priv[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if kind is None:
        return None
    pub = _find_public(session, priv)
    if pub is None:
        return None
    point = pub[Attribute.EC_POINT]
    if kind is KeyKind.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(_der_octets(point, 32))
    return ec.EllipticCurvePublicKey.from_encoded_point(_EC_CURVES[kind], _der_octets(point, 65))


def _find_public(session: Any, priv: Any) -> Any:
    key_id = _attr(priv, Attribute.ID, b"")
    query: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    if key_id:
        query[Attribute.ID] = key_id
    else:
        query[Attribute.LABEL] = priv[Attribute.LABEL]
    return next(iter(session.get_objects(query)), None)


def _key_info(session: Any, priv: Any) -> KeyInfo:
    kind, type_name = _classify(priv)
    return KeyInfo(
        label=priv[Attribute.LABEL],
        id=_attr(priv, Attribute.ID, b"") or b"",
        kind=kind,
        type_name=type_name,
        public_key=_public_key(session, priv, kind),
        sensitive=bool(_attr(priv, Attribute.SENSITIVE, False)),
        extractable=bool(_attr(priv, Attribute.EXTRACTABLE, True)),
        always_sensitive=bool(_attr(priv, Attribute.ALWAYS_SENSITIVE, False)),
        never_extractable=bool(_attr(priv, Attribute.NEVER_EXTRACTABLE, False)),
    )


def _sign_with(priv: Any, kind: KeyKind, message: bytes) -> bytes:
    if kind is KeyKind.ED25519:
        return bytes(priv.sign(message, mechanism=Mechanism.EDDSA))
    if kind in _EC_PARAMS:
        # SoftHSM 2.6 has no CKM_ECDSA_SHA256: hash here, sign the digest with CKM_ECDSA (raw r||s).
        raw = bytes(priv.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    return bytes(priv.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS))


# --------------------------------------------------------------------------------------------------
# The token


class _Worker:
    """One thread's session and the private-key handles found through it."""

    def __init__(self, session: Any, generation: int) -> None:
        self.session = session
        self.generation = generation
        self.keys: dict[tuple[str, bytes], Any] = {}

    def key(self, info: KeyInfo) -> Any:
        found = self.keys.get((info.label, info.id))
        if found is None:
            query: dict[str, Any] = {"object_class": ObjectClass.PRIVATE_KEY, "label": info.label}
            if info.id:
                query["id"] = info.id
            found = self.keys[(info.label, info.id)] = self.session.get_key(**query)
        return found


class _Gate:
    """Many signers or one recovery: recovery must never finalize the module under a running call.

    ``shared()`` runs on every signature, so it returns one reusable object over a plain Lock: a
    generator-based context manager over the Condition's default RLock cost about 5 µs a call, this about 2.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._readers = 0
        self._writer = False
        self._shared = _Shared(self)

    def shared(self) -> _Shared:
        return self._shared

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            while self._writer:
                self._cv.wait()
            self._writer = True
            while self._readers:
                self._cv.wait()
        try:
            yield
        finally:
            with self._lock:
                self._writer = False
                self._cv.notify_all()


class _Shared:
    """The reader side of a :class:`_Gate`; keeps no state of its own, so one instance serves every thread."""

    __slots__ = ("_gate",)

    def __init__(self, gate: _Gate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        gate = self._gate
        with gate._lock:
            while gate._writer:
                gate._cv.wait()
            gate._readers += 1

    def __exit__(self, *exc: object) -> None:
        gate = self._gate
        with gate._lock:
            gate._readers -= 1
            if not gate._readers and gate._writer:  # only a writer waits for the readers to drain
                gate._cv.notify_all()


@dataclass(frozen=True)
class TokenIdentity:
    label: str
    serial: str
    manufacturer: str
    model: str

    def describe(self) -> dict[str, str]:
        return {"label": self.label, "serial": self.serial, "manufacturer": self.manufacturer, "model": self.model}


# Errors on one session or handle: retried once on a fresh session before the token is suspected.
_STALE = (p11.SessionHandleInvalid, p11.SessionClosed, p11.ObjectHandleInvalid, p11.KeyHandleInvalid)
_MAX_BACKOFF = 10.0


class Token:
    """A logged-in token. Thread-safe: each calling thread signs on its own session.

    Faults (``anchors-agents.md`` §7): a stale session or handle is retried once on a fresh session; any
    other device error opens the circuit (``degraded``: requests fail fast with 503) and a background
    thread recovers: re-open sessions and log in again, then unload and reload the module, with backoff.
    Before signing again it checks that the token has the same serial and that every expected key still
    signs and verifies against the public key known at start-up. A rejected, locked or expired PIN stops
    recovery (``down``): it is never retried by itself.
    """

    def __init__(self, cfg: TokenConfig, pin: Secret, lib: Any, raw: _RawModule, token: Any, anchor: Any) -> None:
        self.module = cfg.module
        self._cfg = cfg
        self._pin = pin  # kept only to log in again after the device dropped the session
        self._lib = lib
        self._raw = raw
        self._token = token
        self._anchor = anchor
        self._anchor_lock = threading.RLock()
        self._local = threading.local()
        self._workers: list[_Worker] = []
        self._workers_lock = threading.Lock()
        self._generation = 0
        self._gate = _Gate()
        self.identity = TokenIdentity(
            label=token.label,
            serial=token.serial.decode("ascii", "replace"),
            manufacturer=token.manufacturer_id,
            model=token.model,
        )
        self._closed = False
        self._expected: list[KeyInfo] = []
        self.state = "ok"
        self.reason: str | None = None
        self.reconnects = 0
        self._recovering = threading.Lock()
        self._stop = threading.Event()
        self._probe: threading.Thread | None = None
        self.on_event: Callable[[str, str], None] | None = None  # (event, state), e.g. for metrics

    def _emit(self, event: str) -> None:
        if self.on_event is not None:
            self.on_event(event, self.state)

    # -- opening and closing -----------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: TokenConfig, pin: Secret, *, rw: bool = False) -> Token:
        """Load the module, find the token and log in once. A rejected PIN is never retried."""
        for name, value in cfg.module_env.items():
            os.environ[name] = value
        lib, raw = load_module(cfg.module)
        token = find_token(lib, cfg)
        anchor = _login(token, pin, rw=rw)
        return cls(cfg, pin, lib, raw, token, anchor)

    def start_probe(self, interval: float | None = None) -> None:
        """Check the token every ``interval`` seconds: keeps idle sessions alive, notices faults early."""
        period = interval if interval is not None else self._cfg.probe_interval
        self._probe = threading.Thread(target=self._probe_loop, args=(period,), name="token-probe", daemon=True)
        self._probe.start()

    def close(self) -> None:
        """Stop background work, close worker sessions, then log out. Errors are ignored on the way out."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._probe is not None:
            self._probe.join(timeout=5)
        with self._gate.exclusive():
            self._close_sessions()
        self._pin = Secret("", "cleared")

    def _close_sessions(self) -> None:
        with self._workers_lock:
            workers, self._workers = self._workers, []
            self._generation += 1
        for w in workers:
            try:
                w.session.close()
            except p11.PKCS11Error:
                pass
        with self._anchor_lock:
            try:
                self._anchor.close()
            except p11.PKCS11Error:
                pass

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        return f"token {self.identity.label!r} (serial {self.identity.serial})"

    # -- keys ----------------------------------------------------------------------------------------

    def expect_keys(self, keys: list[KeyInfo]) -> None:
        """The keys that must still be there, unchanged, before signing resumes after a reconnect."""
        self._expected = list(keys)

    def keys(self) -> list[KeyInfo]:
        with self._anchor_lock, self._errors("list keys"):
            privs = list(self._anchor.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            return [_key_info(self._anchor, p) for p in privs]

    def find_key(self, label: str, key_id: bytes | None = None) -> KeyInfo:
        with self._anchor_lock, self._errors(f"find key {label!r}"):
            return _find_key(self._anchor, label, key_id, self.name)

    def generate(self, kind: KeyKind, label: str) -> KeyInfo:
        """Generate a key pair on the device: private half SENSITIVE, non-EXTRACTABLE, PRIVATE, SIGN only."""
        if not label:
            raise UnsupportedKey("a key needs a non-empty label")
        key_id = secrets.token_bytes(8)
        with self._anchor_lock, self._errors("generate a key"):
            if next(iter(self._anchor.get_objects({Attribute.LABEL: label})), None) is not None:
                raise KeyExists(f"an object labelled {label!r} already exists on {self.name}")
            s = self._anchor
            common = {"id": key_id, "label": label, "store": True}
            if kind is KeyKind.ED25519:
                try:
                    _, priv = s.generate_keypair(
                        KeyType.EC_EDWARDS,
                        mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                        public_template={**PUBLIC_TEMPLATE, Attribute.EC_PARAMS: _ED25519_OID},
                        private_template=PRIVATE_TEMPLATE,
                        **common,
                    )
                except (p11.DomainParamsInvalid, p11.AttributeValueInvalid):
                    # Modules that predate RFC 8410 OIDs in PKCS#11 only know the curve by name.
                    _, priv = s.generate_keypair(
                        KeyType.EC_EDWARDS,
                        mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                        public_template={**PUBLIC_TEMPLATE, Attribute.EC_PARAMS: _ED25519_NAME},
                        private_template=PRIVATE_TEMPLATE,
                        **common,
                    )
            elif kind in _EC_PARAMS:
                params = s.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: _EC_PARAMS[kind]}, local=True)
                _, priv = params.generate_keypair(
                    public_template=PUBLIC_TEMPLATE, private_template=PRIVATE_TEMPLATE, **common
                )
            else:
                _, priv = s.generate_keypair(
                    KeyType.RSA,
                    _RSA_BITS[kind],
                    public_template=PUBLIC_TEMPLATE,
                    private_template=PRIVATE_TEMPLATE,
                    **common,
                )
            info = _key_info(s, priv)
            if info.extractable or not info.sensitive:
                # A module that ignored the template must not leave an exportable key behind.
                for obj in list(s.get_objects({Attribute.ID: key_id, Attribute.LABEL: label})):
                    obj.destroy()
                raise TokenError(f"{self.name} did not honour SENSITIVE/non-EXTRACTABLE; key destroyed")
            return info

    # -- signing -------------------------------------------------------------------------------------

    def sign(self, key: KeyInfo, message: bytes) -> bytes:
        """Sign ``message`` on the device with ``key``, in the encoding Dfns expects for its type."""
        if key.kind is None:
            raise UnsupportedKey(f"key {key.label!r} is {key.type_name}; cannot sign with it")
        if self.state != "ok":
            raise CircuitOpen(f"{self.name} is unavailable: {self.reason}")
        with self._gate.shared():
            for attempt in (1, 2):
                worker = self._worker()
                try:
                    return _sign_with(worker.key(key), key.kind, message)
                except _STALE as e:
                    self._drop_worker(worker)
                    if attempt == 1:
                        continue  # an idle session the device expired, or a stale handle: once more, fresh
                    error: BaseException = e
                except p11.PKCS11Error as e:
                    self._drop_worker(worker)
                    error = e
                break
        self._fault(f"signing with {key.label!r} failed: {describe(error)}")
        raise TokenUnavailable(f"{self.name} could not sign with {key.label!r}: {describe(error)}")

    def _worker(self) -> _Worker:
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is not None and worker.generation == self._generation:
            return worker
        if self._closed:
            raise TokenUnavailable(f"{self.name} is closed")
        try:
            session = self._token.open()
        except p11.PKCS11Error as e:
            self._fault(f"cannot open a session: {describe(e)}")
            raise TokenUnavailable(f"cannot open a session on {self.name}: {describe(e)}") from None
        with self._workers_lock:
            worker = _Worker(session, self._generation)
            self._workers.append(worker)
        self._local.worker = worker
        return worker

    def _drop_worker(self, worker: _Worker) -> None:
        self._local.worker = None
        with self._workers_lock:
            if worker in self._workers:
                self._workers.remove(worker)
        try:
            worker.session.close()
        except p11.PKCS11Error:
            pass

    # -- faults and recovery ---------------------------------------------------------------------------

    def _fault(self, reason: str) -> None:
        """Open the circuit and start recovering in the background (once)."""
        if self._closed or self.state == "down":
            return
        if self.state == "ok":
            log.warning("%s: %s; recovering", self.name, reason)
        self.state, self.reason = "degraded", reason
        self._emit("fault")
        if self._recovering.acquire(blocking=False):
            threading.Thread(target=self._recover, name="token-recovery", daemon=True).start()

    def _recover(self) -> None:
        try:
            delay, attempt = 0.2, 0
            while not self._stop.is_set():
                attempt += 1
                try:
                    with self._gate.exclusive():
                        self._reconnect(reload_module=attempt > 1)
                except (PinRejected, PinLocked) as e:
                    self.state, self.reason = "down", e.message
                    self._emit("down")
                    log.error("%s: %s; not retrying the PIN", self.name, e.message)
                    return
                except IdentityMismatch as e:
                    self.state, self.reason = "down", e.message
                    self._emit("down")
                    log.error("%s: %s", self.name, e.message)
                    # keep checking: the right token may come back
                except (TokenError, p11.PKCS11Error) as e:
                    reason = e.message if isinstance(e, TokenError) else describe(e)
                    self.reason = f"reconnecting (attempt {attempt}): {reason}"
                    log.info("%s: %s", self.name, self.reason)
                else:
                    self.reconnects += 1
                    self.state, self.reason = "ok", None
                    self._emit("reconnected")
                    log.warning("%s: reconnected and verified (attempt %d)", self.name, attempt)
                    return
                self._stop.wait(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
        finally:
            self._recovering.release()

    def _reconnect(self, *, reload_module: bool) -> None:
        """Sessions again (and the module again, on later attempts); then prove it is the same token."""
        self._close_sessions()
        if reload_module:
            unload_module(self.module)
            self._lib, self._raw = load_module(self.module)
        try:
            token = find_token(self._lib, self._cfg)
        except TokenUnavailable:
            raise
        serial = token.serial.decode("ascii", "replace")
        if serial != self.identity.serial:
            raise IdentityMismatch(
                f"the token now answering has serial {serial}, not {self.identity.serial}; refusing to use it"
            )
        anchor = _login(token, self._pin, rw=False)
        try:
            for expected in self._expected:
                found = _find_key(anchor, expected.label, expected.id or None, self.name)
                if found.fingerprint != expected.fingerprint:
                    raise IdentityMismatch(
                        f"key {expected.label!r} on {self.name} is not the key the agent started with"
                    )
                _self_test(anchor, found, expected)
        except BaseException:
            try:
                anchor.close()
            except p11.PKCS11Error:
                pass
            raise
        with self._anchor_lock:
            self._token, self._anchor = token, anchor

    def _probe_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            if self.state != "ok":
                continue
            try:
                with self._gate.shared(), self._anchor_lock:
                    logged_in = self._raw.session_state(self._anchor.handle) in _USER_STATES
                    flags = self._token.slot.get_token().flags
                    for expected in self._expected[:1]:  # a call that reaches the device, not just the library
                        _find_key(self._anchor, expected.label, expected.id or None, self.name)
            except (TokenError, p11.PKCS11Error) as e:
                self._fault(f"probe failed: {e.message if isinstance(e, TokenError) else describe(e)}")
                continue
            if flags & TokenFlag.USER_PIN_LOCKED:
                self.state, self.reason = "down", f"{self.name} reports its user PIN is locked"
                self._emit("down")
            elif not logged_in:
                self._fault("the token session is no longer logged in")

    def health(self) -> dict[str, Any]:
        """State (ok / degraded / down), reason, and whether the anchor session is there and logged in."""
        present = logged_in = False
        if self.state == "ok":
            try:
                with self._anchor_lock:
                    logged_in = self._raw.session_state(self._anchor.handle) in _USER_STATES
                present = True
            except TokenError as e:
                self._fault(f"health check failed: {e.message}")
            if present and not logged_in:
                self._fault("the token session is no longer logged in")
        out: dict[str, Any] = {
            "state": self.state,
            "present": present,
            "logged_in": logged_in,
            "reconnects": self.reconnects,
        }
        if self.reason:
            out["reason"] = self.reason
        return out

    # -- helpers -------------------------------------------------------------------------------------

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except p11.PKCS11Error as e:
            raise TokenUnavailable(f"cannot {what} on {self.name}: {describe(e)}") from None


def _login(token: Any, pin: Secret, *, rw: bool) -> Any:
    """Open the anchor session and log in. Checks the PIN flags first; never retries."""
    flags = token.flags
    name = f"token {token.label!r}"
    if flags & TokenFlag.USER_PIN_LOCKED:
        raise PinLocked(f"{name} reports its user PIN is locked; unlock it with the token's SO tools")
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        raise PinLocked(
            f"{name} reports one PIN attempt left; not trying, because a wrong PIN would lock it. "
            "Log in once with the vendor's tool to confirm the PIN, then start the agent again"
        )
    try:
        return token.open(user_pin=pin.reveal(), rw=rw)
    except p11.PinIncorrect:
        raise PinRejected(
            f"{name} rejected the PIN from {pin.source}; not retrying (retries can lock the token)"
        ) from None
    except (p11.PinLocked, p11.PinExpired) as e:
        raise PinLocked(f"{name} refused login: {describe(e)}") from None
    except (p11.PinInvalid, p11.PinLenRange) as e:
        raise PinRejected(f"{name} refused the PIN from {pin.source}: {describe(e)}") from None
    except p11.UserAlreadyLoggedIn:
        # Login state is per application: another Token in this process already logged in.
        return token.open(rw=rw)
    except p11.PKCS11Error as e:
        raise TokenUnavailable(f"cannot log in to {name}: {describe(e)}") from None


def _find_key(session: Any, label: str, key_id: bytes | None, where: str) -> KeyInfo:
    query: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
    if key_id:
        query[Attribute.ID] = key_id
    found = list(session.get_objects(query))
    if not found:
        raise KeyNotFound(f"no private key labelled {label!r} on {where}")
    if len(found) > 1:
        ids = ", ".join(_attr(p, Attribute.ID, b"").hex() or "(none)" for p in found)
        raise KeyNotFound(f"{len(found)} private keys are labelled {label!r} (ids {ids}); set key_id")
    info = _key_info(session, found[0])
    if info.kind is None:
        raise UnsupportedKey(f"key {label!r} is {info.type_name}; supported: {_kinds()}")
    if info.public_key is None:
        raise UnsupportedKey(f"key {label!r} has no public key object on {where}")
    return info


def _self_test(session: Any, found: KeyInfo, expected: KeyInfo) -> None:
    """Sign a fresh nonce with the key on the device and verify it with the public key known at start-up."""
    assert found.kind is not None and expected.public_key is not None
    nonce = b"dfns-agent self-test " + secrets.token_bytes(16)
    priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=found.label, id=found.id or None)
    signature = _sign_with(priv, found.kind, nonce)
    try:
        pub = expected.public_key
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(signature, nonce)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(signature, nonce, ec.ECDSA(hashes.SHA256()))
        else:
            pub.verify(signature, nonce, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise IdentityMismatch(f"key {found.label!r} failed the sign/verify self-test") from None


def find_token(lib: Any, cfg: TokenConfig) -> Any:
    """The one token that matches the configured label or serial."""
    try:
        if cfg.serial is not None:
            matches = list(_tokens(lib, serial=cfg.serial.encode()))
            what = f"serial {cfg.serial!r}"
        else:
            matches = list(_tokens(lib, label=cfg.label))
            what = f"label {cfg.label!r}"
    except p11.PKCS11Error as e:
        raise TokenUnavailable(f"cannot list tokens of {cfg.module}: {describe(e)}") from None
    if not matches:
        available = ", ".join(repr(t.label) for t in _tokens(lib)) or "none"
        raise TokenUnavailable(f"no token with {what} in {cfg.module}; tokens present: {available}")
    if len(matches) > 1:
        raise TokenUnavailable(f"{len(matches)} tokens have {what}; select the token by serial instead")
    return matches[0]


def _tokens(lib: Any, label: str | None = None, serial: bytes | None = None) -> Iterator[Any]:
    for slot in lib.get_slots(token_present=True):
        try:
            tok = slot.get_token()
        except (p11.TokenNotPresent, p11.TokenNotRecognised):
            continue
        if label is not None and tok.label != label:
            continue
        if serial is not None and tok.serial != serial:
            continue
        yield tok


def _kinds() -> str:
    return ", ".join(k.value for k in KeyKind)
