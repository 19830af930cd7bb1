"""Checks 1-4, the PKCS#11 chain: module → token → PIN → keys, each needing the one before.

They go through the agent's own code (``agent/token/``), so they fail exactly where ``serve`` would; the
PIN is tried at most once, never when the token says its last attempt is left or the PIN is locked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from agent.config import Config, CredentialConfig, TokenConfig
from agent.core.checkpoint import parse, signer_for
from agent.diagnostics.config_checks import EXAMPLE
from agent.diagnostics.results import Check, failed, passed
from agent.diagnostics.secret_checks import PIN_KEYS, secret_fix
from agent.errors import (
    ConfigError,
    KeyNotFound,
    KeyUsageRefused,
    PinLocked,
    PinRejected,
    SecretError,
    SelfTestFailed,
    TokenError,
    TokenUnavailable,
    UnsupportedKey,
    UnsupportedMechanism,
)
from agent.secret import Secret, read_pin
from agent.token import KeyInfo, Token


def check_module(cfg: TokenConfig) -> tuple[Any, Check]:
    """dlopen + C_Initialize as ``agent/token/module.py`` does it, with the module's environment applied."""
    from agent.token import load_module

    path = cfg.module
    if not os.path.isabs(path):
        return None, failed(
            "module",
            f"{path!r} is not an absolute path",
            "set [token] module to the library's absolute path, e.g. /usr/lib/softhsm/libsofthsm2.so "
            "(relative paths would depend on the loader's search path)",
        )
    if not os.path.isfile(path):
        return None, failed(
            "module",
            f"{path} does not exist",
            "install the vendor's PKCS#11 module (SoftHSM: apt install softhsm2, which provides "
            "/usr/lib/softhsm/libsofthsm2.so) or correct [token] module",
        )
    for name, value in cfg.module_env.items():
        os.environ[name] = value  # e.g. SOFTHSM2_CONF: read by the module during C_Initialize
    try:
        loaded = load_module(path)
    except TokenUnavailable as e:
        return None, failed("module", e.message, _module_fix(path, cfg))
    lib = loaded.lib
    major, minor = lib.library_version
    ck_major, ck_minor = lib.cryptoki_version
    desc = f"{lib.library_description.strip()} {major}.{minor} by {lib.manufacturer_id.strip()}"
    if loaded.cant_lock:
        locking = "cannot use OS locking (CKR_CANT_LOCK): called one at a time"
    elif loaded.os_locking:
        locking = "OS locking"
    else:
        locking = "a new instance per caller, module's own locking"
    return lib, passed("module", f"{path}: {desc} (Cryptoki {ck_major}.{ck_minor}; {locking})")


def _module_fix(path: str, cfg: TokenConfig) -> str:
    """SoftHSM's usual failure is its config file; other modules most often miss a library or a setting."""
    if "softhsm" in os.path.basename(path).lower():
        conf = os.environ.get("SOFTHSM2_CONF")
        if not conf:
            return 'set SOFTHSM2_CONF = "/path/to/softhsm2.conf" in [token.module_env]'
        if not os.access(conf, os.R_OK):
            return f"SOFTHSM2_CONF is {conf}, which does not exist or is not readable: fix [token.module_env]"
        return f"check that directories.tokendir in {conf} exists and is readable and writable by this user"
    env = ", ".join(cfg.module_env) or "none"
    return (
        f"check that {path} is a PKCS#11 module for this architecture and that its libraries resolve (ldd {path}); "
        f"put any environment it needs in [token.module_env] (set now: {env})"
    )


def check_token(lib: Any, cfg: TokenConfig) -> tuple[Any, Check]:
    """The configured token by label or serial; on failure, the tokens that are there instead."""
    from agent.token.module import find_token

    try:
        tok = find_token(lib, cfg)
    except TokenUnavailable as e:
        present = present_tokens(lib)
        listed = "; ".join(t.describe() for t in present) or "none"
        what = f"serial {cfg.serial!r}" if cfg.serial is not None else f"label {cfg.label!r}"
        same = [t for t in present if t.serial == cfg.serial or (cfg.serial is None and t.label == cfg.label)]
        problem = f"no token with {what}; tokens present: {listed}" if not same else f"{e.message}; {listed}"
        usable = [t for t in present if t.label is not None]
        if not usable:
            fix = (
                "initialize a token or plug the device in; for SoftHSM check that SOFTHSM2_CONF in [token.module_env] "
                "points at the softhsm2.conf whose directories.tokendir holds your token"
            )
        else:
            line = f'serial = "{usable[0].serial}"' if len(usable) == 1 else 'serial = "…"'
            fix = (
                f"set {line} in [token]{' (instead of label)' if cfg.label else ''} to select one of the tokens "
                "present; the serial is safer: "
                "labels can repeat, and slot ids change whenever a token is re-initialized (where serials repeat "
                "too, as on opencryptoki and tpm2-pkcs11, set both label and serial)"
            )
        return None, failed("token", problem, fix)
    serial = tok.serial.decode("ascii", "replace").strip()
    warnings = []
    if cfg.label is None and (not serial.strip("0") or sum(t.serial == serial for t in present_tokens(lib)) > 1):
        warnings.append(
            f"serial {serial} is not unique on this module: set label too; after a reconnect the agent checks "
            "label, serial, manufacturer, model and every key's public key"
        )
    return tok, passed(
        "token",
        f"{tok.label!r}, serial {serial}, {tok.manufacturer_id.strip()} {tok.model.strip()}".rstrip(),
        *warnings,
    )


@dataclass(frozen=True)
class PresentToken:
    """A token the module shows; ``label`` is None for an uninitialized one."""

    label: str | None
    serial: str
    slot: int

    def describe(self) -> str:
        if self.label is None:
            return f"an uninitialized token (slot {self.slot})"
        return f"{self.label!r} (serial {self.serial}, slot {self.slot})"


def present_tokens(lib: Any) -> list[PresentToken]:
    """Every token the module shows, to say what *is* there when the configured one is not."""
    import pkcs11
    from pkcs11 import TokenFlag

    found = []
    try:
        slots = lib.get_slots(token_present=True)
    except pkcs11.PKCS11Error:
        return []
    for slot in slots:
        try:
            tok = slot.get_token()
        except pkcs11.PKCS11Error:
            continue
        initialized = bool(tok.flags & TokenFlag.TOKEN_INITIALIZED)
        serial = tok.serial.decode("ascii", "replace").strip()
        found.append(PresentToken(tok.label if initialized else None, serial, int(slot.slot_id)))
    return found


@dataclass(frozen=True)
class PinResult:
    """The PIN check, the logged-in token when it passed, and whether the PIN source itself was read (if
    not, the doctor checks the PIN file on its own later)."""

    check: Check
    token: Token | None = None
    source_checked: bool = False


def check_pin(cfg: TokenConfig, p11_token: Any) -> PinResult:
    """Read the PIN from its source, then log in exactly once through :class:`Token` (which never retries)."""
    from pkcs11 import TokenFlag

    flags = p11_token.flags
    name = f"token {p11_token.label!r}"
    unlock = (
        "have the security officer reset the user PIN (e.g. pkcs11-tool --module MODULE --login --login-type so "
        "--init-pin, or the vendor's tool)"
    )
    if flags & TokenFlag.USER_PIN_LOCKED:
        return PinResult(failed("pin", f"{name} reports its user PIN is locked; not trying", unlock))
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        return PinResult(
            failed(
                "pin",
                f"{name} reports one PIN attempt left; not trying, because a wrong PIN would lock it",
                "confirm the PIN once with the vendor's tool (which resets the counter when it is right), "
                "then run the doctor again",
            )
        )
    if flags & TokenFlag.LOGIN_REQUIRED and not flags & TokenFlag.USER_PIN_INITIALIZED:
        return PinResult(failed("pin", f"{name} has no user PIN set", unlock))
    try:
        pin = read_pin(cfg)
    except SecretError as e:
        return PinResult(failed("pin", e.message, secret_fix(cfg.pin, "PIN", PIN_KEYS, prompt=True)), None, True)
    try:
        token = Token.open(cfg, pin)
    except PinRejected:
        problem = f"{name} rejected the PIN from {pin.source}; tried once, NOT retried"
        fix = (
            f"put the right PIN in {_where(pin)}. Every wrong attempt counts towards the token's lockout "
            "(a locked PIN needs the security officer), so check it before running the agent or the doctor again"
        )
        return PinResult(failed("pin", problem, fix), None, True)
    except PinLocked as e:
        return PinResult(failed("pin", e.message, unlock), None, True)
    except TokenUnavailable as e:
        return PinResult(
            failed("pin", e.message, "check the token and module logs; then run the doctor again"), None, True
        )
    warnings = []
    if flags & TokenFlag.USER_PIN_COUNT_LOW:
        warnings.append(f"before this login {name} had counted wrong PIN attempts; something tried a wrong PIN")
    if flags & TokenFlag.USER_PIN_TO_BE_CHANGED:
        warnings.append(f"{name} wants its user PIN changed")
    return PinResult(passed("pin", f"accepted (from {pin.source}); logged in once", *warnings), token, True)


def _where(pin: Secret) -> str:
    return pin.source if pin.source != "prompt" else "the prompt"


def check_credentials_present(config: Config) -> Check | None:
    """A failed "keys" check when there is nothing to sign with (the agent refuses to start then)."""
    if config.credentials:
        return None
    return failed(
        "keys",
        "no [[credential]] configured; the agent refuses to start with nothing to sign with",
        f"add a [[credential]] with name, key (the key's label on the token) and cred_id ({EXAMPLE})",
    )


def check_key(token: Token, cred: CredentialConfig) -> Check:
    """The credential's key is there, unambiguous, of a type Dfns accepts, and cannot leave the token."""
    name = f"key {cred.name}"
    try:
        info = token.find_key(cred.key, cred.key_id)
    except KeyNotFound as e:
        same = [k for k in token.keys() if k.label == cred.key]
        if len(same) > 1:
            ids = ", ".join(k.id.hex() or "(none)" for k in same)
            return failed(name, e.message, f'set key_id = "<hex>" in [[credential]] {cred.name!r} to one of: {ids}')
        return failed(name, e.message, _missing_key_fix(token, f"key in [[credential]] {cred.name!r}", cred.key))
    except UnsupportedKey as e:
        return failed(
            name,
            e.message,
            "Dfns accepts ed25519, p256, secp256k1, rsa2048 and rsa3072 keys whose public key is on the token too; "
            f"make one with dfns-agent keys generate --type TYPE --label LABEL and point [[credential]] {cred.name!r} "
            "at it",
        )
    where = f"{info.label!r} id {info.id.hex() or '(none)'} {info.type_name} {info.fingerprint}"
    if not info.sensitive or info.extractable:
        bad = " and ".join(
            ([] if info.sensitive else ["not SENSITIVE"]) + (["EXTRACTABLE"] if info.extractable else [])
        )
        return failed(
            name,
            f"{where} is {bad}: the private key can be read out of the token",
            f"{_replacement_fix(info, cred)}, then stop using {info.label!r} and destroy it",
        )
    try:
        mechanism = token.check_signing(info)
    except (UnsupportedMechanism, SelfTestFailed) as e:
        return failed(
            name,
            e.message,
            "use a key type this module can sign (see the README's PKCS#11 modules table), or a module or "
            "firmware that offers the mechanism",
        )
    except KeyUsageRefused as e:
        if not info.signs:  # no setting makes such a key sign: it needs a replacement
            fix = _replacement_fix(info, cred)
        else:
            fix = (
                "make a sign-only key (dfns-agent keys generate), or, where the module allows no other "
                "(tpm2-pkcs11), set [token] allow_other_usages = true"
            )
        return failed(name, e.message, fix)
    warnings = []
    if not info.always_sensitive:
        warnings.append("ALWAYS_SENSITIVE is false: the key was readable at some point, a copy may exist elsewhere")
    if not info.never_extractable:
        warnings.append("NEVER_EXTRACTABLE is false: the key was extractable at some point (e.g. imported)")
    if info.other_usages:
        warnings.append(f"also allows {', '.join(info.other_usages)} (accepted: [token] allow_other_usages)")
    return passed(name, f"{where}; sensitive, not extractable; self-test signed with {mechanism}", *warnings)


def _replacement_fix(info: KeyInfo, cred: CredentialConfig) -> str:
    """The fix for a credential's key that cannot be made fit: a new key on the device, registered with Dfns."""
    return (
        f"generate a replacement on the device (dfns-agent keys generate --type {info.type_name} --label NEW), "
        "add a [[credential]] for it and register it with Dfns (dfns-agent register --credential NEW --via "
        f"{cred.name})"
    )


def _missing_key_fix(token: Token, setting: str, label: str) -> str:
    """The fix for a key label not on the token: the labels that are, or how to make the key."""
    labels = ", ".join(sorted({repr(k.label) for k in token.keys()})) or "none"
    return (
        f"fix {setting} (private keys on the token: {labels}), or create it with "
        f"dfns-agent keys generate --type ed25519 --label {label}"
    )


def check_checkpoint_key(config: Config, token: Token) -> Check | None:
    """``[audit] checkpoint_key`` names a dedicated Ed25519 or P-256 key that signs a checkpoint which verifies
    (``serve`` refuses to start otherwise); None when no checkpoints are configured."""
    audit = config.audit
    if not audit.enabled or audit.checkpoint_key is None:
        return None
    name = "checkpoint key"
    try:
        signer = signer_for(audit, token, [c.key for c in config.credentials])
    except ConfigError as e:
        return failed(
            name,
            e.message,
            "generate a key only for checkpoints (dfns-agent keys generate --type ed25519 --label dfns-audit) "
            "and set [audit] checkpoint_key to its label",
        )
    except KeyNotFound as e:
        return failed(name, e.message, _missing_key_fix(token, "[audit] checkpoint_key", audit.checkpoint_key))
    except UnsupportedKey as e:
        return failed(
            name,
            e.message,
            "checkpoints are signed with a sensitive, non-extractable Ed25519 or P-256 key that allows signing "
            "(dfns-agent keys generate --type ed25519 --label LABEL), and [audit] checkpoint_origin has no "
            "spaces or '+'",
        )
    assert signer is not None
    try:
        note = signer.sign(0, "00" * 32)
    except TokenError as e:
        return failed(
            name,
            e.message,
            "use a checkpoint key this module can sign with (see the README's PKCS#11 modules table) that allows "
            "signing (CKA_SIGN)",
        )
    if not parse(note).verify(signer.origin, signer.public_key):
        return failed(name, f"a checkpoint signed with {audit.checkpoint_key!r} does not verify", "replace the key")
    return passed(name, f"{audit.checkpoint_key!r} ({signer.fingerprint}) signs checkpoints for {signer.origin}")
