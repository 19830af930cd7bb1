"""Loading a PKCS#11 module for multi-threaded use, and finding its token.

python-pkcs11 calls ``C_Initialize(NULL)``; SoftHSM then turns its mutexes into no-ops while python-pkcs11
releases the GIL around every call, so two signing threads corrupt its heap. Right after loading we redo
``C_Finalize`` + ``C_Initialize({flags=CKF_OS_LOCKING_OK})`` through the module's own function list, before
any session exists (``shared/reference/pkcs11-softhsm.md``). A module is loaded once per process.

That only works when ``C_GetFunctionList`` hands every caller the same instance (SoftHSM, opencryptoki,
tpm2-pkcs11 and most vendor modules). p11-kit's client and proxy hand out a new, uninitialised instance on
every call, so the list we would get is not python-pkcs11's: there we leave python-pkcs11's instance alone
(p11-kit locks internally and refuses only explicit locking arguments without ``CKF_OS_LOCKING_OK``) and
never call through a list of our own (:attr:`LoadedModule.raw` is None). Which case applies is measured
(two calls, two pointers), not guessed from the file name.

A module that cannot use the OS's locking answers ``CKR_CANT_LOCK``; it is initialised again as
python-pkcs11 had it, and ``[token] concurrency = "auto"`` then makes every call into it one at a time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import exceptions as p11

from agent.config import TokenConfig
from agent.errors import TokenUnavailable
from agent.token.ckr import EXCEPTION_CKR, ckr_name

_UNMAPPED = re.compile(r"Unmapped error code (0x[0-9a-fA-F]+)")

log = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """A short name for a PKCS#11 error, with its ``CKR_*`` name (python-pkcs11's messages are usually empty,
    and codes it does not know come as "Unmapped error code 0x140")."""
    if isinstance(exc, p11.NoSuchKey):
        return "NoSuchKey: the key is no longer on the token"
    text = str(exc)
    unmapped = _UNMAPPED.search(text)
    if unmapped:
        return ckr_name(int(unmapped.group(1), 16))
    name = type(exc).__name__
    ckr = EXCEPTION_CKR.get(name)
    if ckr:
        name = f"{name} ({ckr})"
    return f"{name}: {text}" if text else name


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
_CKR_CANT_LOCK = 0x0A
USER_STATES = frozenset({1, 3})  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS
_RV = ctypes.c_ulong
_InitFn = ctypes.CFUNCTYPE(_RV, ctypes.c_void_p)
_SessionInfoFn = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong, ctypes.POINTER(_CK_SESSION_INFO))
_CloseSessionFn = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong)


def _function_list(dll: ctypes.CDLL, path: str) -> ctypes._Pointer[_CK_FUNCTION_LIST_HEAD]:
    head = ctypes.POINTER(_CK_FUNCTION_LIST_HEAD)()
    get_list = dll.C_GetFunctionList
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CK_FUNCTION_LIST_HEAD))]
    get_list.restype = _RV
    rv = get_list(ctypes.byref(head))
    if rv != 0:
        raise TokenUnavailable(f"C_GetFunctionList of {path} failed ({ckr_name(rv)})")
    return head


def _address(head: ctypes._Pointer[_CK_FUNCTION_LIST_HEAD]) -> int:
    return ctypes.cast(head, ctypes.c_void_p).value or 0


class RawModule:
    """The few entry points python-pkcs11 does not expose, reached through ``C_GetFunctionList``; only for
    modules whose function list is one shared instance (see :func:`shares_one_instance`)."""

    def __init__(self, path: str) -> None:
        self._dll = ctypes.CDLL(path)  # same dlopen handle python-pkcs11 holds
        fl = _function_list(self._dll, path).contents
        self.initialize = _InitFn(fl.f0)
        self.finalize = _InitFn(fl.f1)
        self.close_session = _CloseSessionFn(fl.f13)
        self.get_session_info = _SessionInfoFn(fl.f15)

    def reinitialize_with_locking(self) -> bool:
        """True when the module now locks with the OS's primitives; False when it cannot (``CKR_CANT_LOCK``):
        it is then initialised as before, and must be called one thread at a time."""
        rv = self.finalize(None)
        if rv != 0:
            raise TokenUnavailable(f"C_Finalize failed while enabling OS locking ({ckr_name(rv)})")
        args = _CK_C_INITIALIZE_ARGS(None, None, None, None, _CKF_OS_LOCKING_OK, None)
        rv = self.initialize(ctypes.byref(args))
        if rv == _CKR_CANT_LOCK:
            rv = self.initialize(None)
            if rv not in (0, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
                raise TokenUnavailable(f"C_Initialize failed after CKR_CANT_LOCK ({ckr_name(rv)})")
            return False
        if rv not in (0, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise TokenUnavailable(f"C_Initialize with CKF_OS_LOCKING_OK failed ({ckr_name(rv)})")
        return True

    def session_state(self, handle: int) -> int:
        info = _CK_SESSION_INFO()
        rv = self.get_session_info(handle, ctypes.byref(info))
        if rv != 0:
            raise TokenUnavailable(f"C_GetSessionInfo failed ({ckr_name(rv)})")
        return int(info.state)


def shares_one_instance(path: str) -> bool:
    """Whether ``C_GetFunctionList`` returns the same list on every call (so python-pkcs11's instance is the
    one we reach). p11-kit's client and proxy return a new instance each time."""
    dll = ctypes.CDLL(path)
    return _address(_function_list(dll, path)) == _address(_function_list(dll, path))


@dataclass(frozen=True)
class LoadedModule:
    """A loaded, initialised module: python-pkcs11's ``lib``, and our own entry points when they reach the
    same instance (``raw`` None: a per-call-instance module such as p11-kit's, which locks by itself)."""

    path: str
    lib: Any
    raw: RawModule | None
    manufacturer: str
    description: str
    cant_lock: bool = False  # it answered CKR_CANT_LOCK: initialised without locking, to be called serially

    @property
    def os_locking(self) -> bool:
        """True when we initialised it with ``CKF_OS_LOCKING_OK`` ourselves."""
        return self.raw is not None and not self.cant_lock

    def session_state(self, handle: int) -> int | None:
        """The session's ``CKS_*`` state, or None when this module gives us no way to ask."""
        return self.raw.session_state(handle) if self.raw is not None else None


_modules: dict[str, LoadedModule] = {}
_modules_lock = threading.Lock()


def load_module(path: str) -> LoadedModule:
    """Load a PKCS#11 module once per process, initialized for multi-threaded use."""
    with _modules_lock:
        if path in _modules:
            return _modules[path]
        if not os.path.isabs(path):
            raise TokenUnavailable(f"PKCS#11 module {path!r} is a relative path; give the module's absolute path")
        if not os.path.exists(path):
            raise TokenUnavailable(f"PKCS#11 module {path} does not exist")
        if not os.path.isfile(path):
            raise TokenUnavailable(f"PKCS#11 module {path} is not a regular file")
        try:
            lib = pkcs11.lib(path)
        except p11.PKCS11Error as e:
            raise TokenUnavailable(f"cannot load PKCS#11 module {path}: {describe(e)}") from None
        raw: RawModule | None = None
        cant_lock = False
        if shares_one_instance(path):
            raw = RawModule(path)
            try:
                cant_lock = not raw.reinitialize_with_locking()
            except TokenUnavailable:
                # python-pkcs11 still counts it initialised and would hand it back as it is (finalised) to the
                # next load, whose C_Finalize then fails for ever: drop it, so the next load starts afresh.
                pkcs11.unload(path)
                raise
            if cant_lock:
                log.warning("PKCS#11 module %s cannot use OS locking (CKR_CANT_LOCK): calling it one at a time "
                            "unless [token] concurrency says otherwise", path)  # fmt: skip
        loaded = LoadedModule(path, lib, raw, lib.manufacturer_id, lib.library_description, cant_lock)
        _modules[path] = loaded
        return loaded


def unload_module(path: str) -> None:
    with _modules_lock:
        if _modules.pop(path, None) is not None:
            pkcs11.unload(path)


# Pauses before looking for the token again; None: report what was found. SoftHSM rewrites its token file
# on every C_Login, and another process listing tokens meanwhile gets GeneralError, or misses the token.
_FIND_RETRIES: tuple[float | None, ...] = (0.05, 0.25, None)


def find_token(lib: Any, cfg: TokenConfig) -> Any:
    """The one token that matches the configured label and/or serial (looked for again after a short pause
    when it is missing or listing fails: a login elsewhere can hide it for a moment)."""
    for retry in _FIND_RETRIES:
        try:
            return _find_token_once(lib, cfg)
        except _NotFoundNow as e:
            if retry is None:
                raise TokenUnavailable(e.message) from None
            log.debug("%s; looking again in %gs", e.message, retry)
            time.sleep(retry)
    raise AssertionError("unreachable")  # pragma: no cover


class _NotFoundNow(TokenUnavailable):
    """Listing failed or found no match: maybe only for a moment (see _FIND_RETRIES)."""


def _find_token_once(lib: Any, cfg: TokenConfig) -> Any:
    serial = cfg.serial.encode() if cfg.serial is not None else None
    what = " and ".join(
        ([f"label {cfg.label!r}"] if cfg.label is not None else []) + ([f"serial {cfg.serial!r}"] if serial else [])
    )
    try:
        matches = list(_tokens(lib, label=cfg.label, serial=serial))
    except p11.PKCS11Error as e:
        raise _NotFoundNow(f"cannot list tokens of {cfg.module}: {describe(e)}") from None
    if not matches:
        try:
            available = ", ".join(repr(t.label) for t in _tokens(lib)) or "none"
        except p11.PKCS11Error as e:
            available = f"(cannot list them: {describe(e)})"
        raise _NotFoundNow(f"no token with {what} in {cfg.module}; tokens present: {available}")
    if len(matches) > 1:
        raise TokenUnavailable(
            f"{len(matches)} tokens have {what}; set both label and serial (some modules give every token the "
            "same serial)"
        )
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
