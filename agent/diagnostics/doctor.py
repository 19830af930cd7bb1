"""``dfns-agent doctor``: check, in the order the agent itself needs them, everything start-up depends on.

Most failures users hit are environmental (a wrong module path, a re-initialized token, a group-readable
PIN file, a stale socket, a proxy or a systemd sandbox in the way of Dfns), and the agent can only report
the first one it trips over. The doctor walks the whole chain and prints one ✓/✗ line per check with the
fix for each ✗, so one run shows everything that needs attention.

It is careful in the ways the agent is: the PIN is tried at most once (never when the token says its
last attempt is left or the PIN is locked), neither the PIN nor a Dfns bearer token is ever printed, and
nothing is written (no socket is bound, no audit record is made). Checks that cannot run because one they
depend on failed (module → token → PIN → keys) are shown as skipped, not as failures.

PKCS#11 modules are loaded once per process (``agent.token.device`` caches them by path), so the doctor is meant
to run in its own process, as the CLI command does.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

from agent.config import AuditConfig, Config, CredentialConfig, SecretSource, TokenConfig, find_config, load_config
from agent.errors import ConfigError, KeyNotFound, PinLocked, PinRejected, SecretError, UnsupportedKey
from agent.health import AgentHealth
from agent.secret import Secret, read_pin, read_secret, read_secret_file

_MAX_SUN_PATH = 107  # bytes of sun_path usable for a path (listener.py refuses longer ones)
_DFNS_TIMEOUT = 5.0
_EXAMPLE = "pkcs11_config/agent.example.toml"


@dataclass
class Check:
    """The outcome of one check: one ✓/✗ line, the fix for a ✗, and warnings that do not fail the run."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    warnings: list[str] = field(default_factory=list)


def passed(name: str, detail: str, *warnings: str) -> Check:
    return Check(name, True, detail, warnings=list(warnings))


def failed(name: str, problem: str, fix: str) -> Check:
    return Check(name, False, problem, fix)


class Report:
    """Prints checks as they finish (network checks can take seconds) and remembers whether all passed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ok = True
        ascii_only = not _can_encode(out, "✓✗")
        self._yes, self._no = ("OK", "FAIL") if ascii_only else ("✓", "✗")

    def add(self, check: Check) -> Check:
        self.ok = self.ok and check.ok
        lines = [f"{self._yes if check.ok else self._no} {check.name}: {check.detail}"]
        lines += [f"  warning: {w}" for w in check.warnings]
        if not check.ok and check.fix:
            lines.append(f"  fix: {check.fix}")
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        return check

    def skip(self, name: str, needs: str) -> None:
        self.out.write(f"- {name}: skipped (needs {needs})\n")
        self.out.flush()

    def run(self, name: str, fn: Callable[[], Check]) -> Check:
        """Run one check; an unexpected exception is a ✗ for that check, not a traceback for the whole run."""
        try:
            check = fn()
        except Exception as e:  # noqa: BLE001 - a doctor must report, not crash
            text = getattr(e, "message", None) or str(e) or type(e).__name__
            check = failed(name, f"unexpected error: {type(e).__name__}: {text}", _REPORT_BUG)
        return self.add(check)


_REPORT_BUG = "an unexpected failure in this check; if the message does not explain it, report it with this output"


def _can_encode(out: TextIO, text: str) -> bool:
    encoding = getattr(out, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# The run


def run_doctor(config_path: str | None, out: TextIO, *, socket_override: str | None = None) -> bool:
    """Run every check, print the ✓/✗ list to ``out``; True when every check passed."""
    report = Report(out)
    config = _load(config_path, report)
    if config is None:
        return False
    token: Any = None
    try:
        # 1-3: module, token, PIN; each needs the one before.
        lib = _step_module(config, report)
        p11_token = _step_token(config, lib, report) if lib is not None else None
        if lib is None:
            report.skip("token", "module")
        pin_checked = False
        if p11_token is not None:
            token, pin_checked = _step_pin(config, p11_token, report)
        else:
            report.skip("pin", "module" if lib is None else "token")
        # 4: keys.
        if token is not None:
            _step_keys(config, token, report)
        else:
            report.skip("keys", "pin" if p11_token is not None else "module" if lib is None else "token")
        # 5: socket.
        report.run("socket", lambda: check_socket(_socket_path(config, socket_override)))
        # 6: the rest of the config.
        _step_config(config, report, pin_checked=pin_checked)
        # 7: Dfns, only for credentials that talk to it.
        _step_dfns(config, report)
    finally:
        if token is not None:
            token.close()  # logs out
    return report.ok


def _load(config_path: str | None, report: Report) -> Config | None:
    """The config first: it names the module, so nothing else can be checked without it."""
    try:
        path = find_config(config_path)
    except ConfigError as e:
        report.add(failed("config", e.message, "pass --config PATH, set DFNS_AGENT_CONFIG, or create that file"))
        return None
    try:
        return load_config(path)
    except ConfigError as e:
        fix = f"correct {path} ({_EXAMPLE} documents every setting), then run the doctor again"
        if not path.exists():
            fix = f"create {path} (start from {_EXAMPLE}) or pass the right --config"
        report.add(failed("config", e.message, fix))
        return None


def _step_module(config: Config, report: Report) -> Any:
    found: list[Any] = []

    def run() -> Check:
        lib, check = check_module(config.token)
        found.append(lib)
        return check

    report.run("module", run)
    return found[0] if found else None


def _step_token(config: Config, lib: Any, report: Report) -> Any:
    found: list[Any] = []

    def run() -> Check:
        tok, check = check_token(lib, config.token)
        found.append(tok)
        return check

    report.run("token", run)
    return found[0] if found else None


def _step_pin(config: Config, p11_token: Any, report: Report) -> tuple[Any, bool]:
    """Returns the logged-in :class:`agent.token.device.Token` (or None) and whether the PIN source was checked."""
    result: list[tuple[Any, bool]] = []

    def run() -> Check:
        tok, source_checked, check = check_pin(config.token, p11_token)
        result.append((tok, source_checked))
        return check

    report.run("pin", run)
    return result[0] if result else (None, False)


def _step_keys(config: Config, token: Any, report: Report) -> None:
    if not config.credentials:
        report.add(
            failed(
                "keys",
                "no [[credential]] configured; the agent refuses to start with nothing to sign with",
                f"add a [[credential]] with name, key (the key's label on the token) and cred_id ({_EXAMPLE})",
            )
        )
        return
    for cred in config.credentials:
        report.run(f"key {cred.name}", partial(check_key, token, cred))


def _step_config(config: Config, report: Report, *, pin_checked: bool) -> None:
    report.run("config", lambda: check_config_summary(config))
    if not pin_checked:
        pin_source = check_pin_source(config.token.pin)
        if pin_source is not None:
            report.add(pin_source)
    report.run("audit log", lambda: check_audit(config.audit))
    for cred in config.credentials:
        if cred.dfns is not None:
            report.run(f"dfns token {cred.name}", partial(check_dfns_token, cred))


def _step_dfns(config: Config, report: Report) -> None:
    creds = [c for c in config.credentials if c.dfns is not None]
    if not creds:
        return
    answers: dict[str, Check] = {}  # one request per distinct URL: a dead host should cost 5 s once
    with httpx.Client(timeout=_DFNS_TIMEOUT, follow_redirects=False, headers={"User-Agent": _user_agent()}) as http:
        for cred in creds:
            assert cred.dfns is not None
            url = cred.dfns.base_url
            if url not in answers:
                answers[url] = report.run(f"dfns {cred.name}", partial(check_dfns_url, http, cred.name, url))
            else:
                earlier = answers[url]
                report.add(Check(f"dfns {cred.name}", earlier.ok, earlier.detail, earlier.fix))


def _socket_path(config: Config, override: str | None) -> Path:
    from agent.paths import socket_path_for  # the same rule `serve` uses

    return Path(os.path.abspath(socket_path_for(config, override)))


def _user_agent() -> str:
    from agent.dfnsapi.client import USER_AGENT

    return USER_AGENT


# --------------------------------------------------------------------------------------------------
# 1-3: module, token, PIN


def check_module(cfg: TokenConfig) -> tuple[Any, Check]:
    """dlopen + C_Initialize through agent.token.device, with the module's environment applied as the agent does."""
    from agent.errors import TokenUnavailable
    from agent.token.device import load_module

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
        lib, _raw = load_module(path)
    except TokenUnavailable as e:
        return None, failed("module", e.message, _module_fix(path, cfg))
    major, minor = lib.library_version
    ck_major, ck_minor = lib.cryptoki_version
    desc = f"{lib.library_description.strip()} {major}.{minor} by {lib.manufacturer_id.strip()}"
    return lib, passed("module", f"{path}: {desc} (Cryptoki {ck_major}.{ck_minor})")


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
    from agent.errors import TokenUnavailable
    from agent.token.device import find_token

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
                "labels can repeat, and slot ids change whenever a token is re-initialized"
            )
        return None, failed("token", problem, fix)
    serial = tok.serial.decode("ascii", "replace").strip()
    return tok, passed(
        "token", f"{tok.label!r}, serial {serial}, {tok.manufacturer_id.strip()} {tok.model.strip()}".rstrip()
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


def check_pin(cfg: TokenConfig, p11_token: Any) -> tuple[Any, bool, Check]:
    """Read the PIN from its source, then log in exactly once through agent.token.device (which never retries).

    Returns the logged-in Token or None, whether the PIN source itself was checked, and the check.
    """
    from pkcs11 import TokenFlag

    from agent.errors import TokenUnavailable
    from agent.token.device import Token

    flags = p11_token.flags
    name = f"token {p11_token.label!r}"
    unlock = (
        "have the security officer reset the user PIN (e.g. pkcs11-tool --module MODULE --login --login-type so "
        "--init-pin, or the vendor's tool)"
    )
    if flags & TokenFlag.USER_PIN_LOCKED:
        return None, False, failed("pin", f"{name} reports its user PIN is locked; not trying", unlock)
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        return (
            None,
            False,
            failed(
                "pin",
                f"{name} reports one PIN attempt left; not trying, because a wrong PIN would lock it",
                "confirm the PIN once with the vendor's tool (which resets the counter when it is right), "
                "then run the doctor again",
            ),
        )
    if flags & TokenFlag.LOGIN_REQUIRED and not flags & TokenFlag.USER_PIN_INITIALIZED:
        return None, False, failed("pin", f"{name} has no user PIN set", unlock)
    try:
        pin = read_pin(cfg)
    except SecretError as e:
        return None, True, failed("pin", e.message, _secret_fix(cfg.pin, "PIN", _PIN_KEYS, prompt=True))
    try:
        token = Token.open(cfg, pin)
    except PinRejected:
        return (
            None,
            True,
            failed(
                "pin",
                f"{name} rejected the PIN from {pin.source}; tried once, NOT retried",
                f"put the right PIN in {_where(pin)}. Every wrong attempt counts towards the token's lockout "
                "(a locked PIN needs the security officer), so check it before running the agent or the doctor again",
            ),
        )
    except PinLocked as e:
        return None, True, failed("pin", e.message, unlock)
    except TokenUnavailable as e:
        return None, True, failed("pin", e.message, "check the token and module logs; then run the doctor again")
    warnings = []
    if flags & TokenFlag.USER_PIN_COUNT_LOW:
        warnings.append(f"before this login {name} had counted wrong PIN attempts; something tried a wrong PIN")
    if flags & TokenFlag.USER_PIN_TO_BE_CHANGED:
        warnings.append(f"{name} wants its user PIN changed")
    return token, True, passed("pin", f"accepted (from {pin.source}); logged in once", *warnings)


def _where(pin: Secret) -> str:
    return pin.source if pin.source != "prompt" else "the prompt"


_PIN_KEYS = ("[token.pin] file", "[token.pin] env")
_DFNS_KEYS = ("[credential.dfns] token_file", "[credential.dfns] token_env")


def _secret_fix(source: SecretSource, what: str, keys: tuple[str, str], *, prompt: bool) -> str:
    """A fix for an unusable secret source, judged from the source itself (not from the error text)."""
    if source.file is not None:
        try:
            st = os.lstat(source.file)
        except FileNotFoundError:
            return f"create {source.file} holding the {what}, owned by the agent's user, mode 0600 (or fix {keys[0]})"
        except OSError as e:
            return f"make {source.file} readable by the agent's user ({e.strerror}); keep it mode 0600"
        if not stat.S_ISREG(st.st_mode):
            return f"make {source.file} a regular file (not a symlink or directory), mode 0600"
        if st.st_mode & 0o077:
            return f"chmod 600 {source.file} (and keep it owned by the agent's user)"
        if st.st_uid != os.geteuid():
            return f"chown {source.file} to the agent's user, or run the agent as its owner (uid {st.st_uid})"
        return f"put the {what} in {source.file} as UTF-8 text (one trailing newline is ignored)"
    cred = f"LoadCredential={source.credential}:PATH" if source.credential else "LoadCredential="
    sources = f"set {keys[0]} = PATH (a mode 0600 file), use {cred} under systemd, or {keys[1]} = VARIABLE"
    if prompt and source.prompt:
        sources += ", or run from a terminal to be prompted"
    return sources


# --------------------------------------------------------------------------------------------------
# 4: keys


def check_key(token: Any, cred: CredentialConfig) -> Check:
    """The credential's key is there, unambiguous, of a type Dfns accepts, and cannot leave the token."""
    name = f"key {cred.name}"
    try:
        info = token.find_key(cred.key, cred.key_id)
    except KeyNotFound as e:
        same = [k for k in token.keys() if k.label == cred.key]
        if len(same) > 1:
            ids = ", ".join(k.id.hex() or "(none)" for k in same)
            return failed(name, e.message, f'set key_id = "<hex>" in [[credential]] {cred.name!r} to one of: {ids}')
        labels = ", ".join(sorted({repr(k.label) for k in token.keys()})) or "none"
        return failed(
            name,
            e.message,
            f"fix key in [[credential]] {cred.name!r} (private keys on the token: {labels}), or create it with "
            f"dfns-agent keys generate --type ed25519 --label {cred.key}",
        )
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
            f"generate a replacement on the device (dfns-agent keys generate --type {info.type_name} --label NEW), "
            "add a [[credential]] for it and register it with Dfns (dfns-agent register --credential NEW --via "
            f"{cred.name}), then stop using {info.label!r} and destroy it",
        )
    warnings = []
    if not info.always_sensitive:
        warnings.append("ALWAYS_SENSITIVE is false: the key was readable at some point, a copy may exist elsewhere")
    if not info.never_extractable:
        warnings.append("NEVER_EXTRACTABLE is false: the key was extractable at some point (e.g. imported)")
    return passed(name, f"{where}; sensitive, not extractable", *warnings)


# --------------------------------------------------------------------------------------------------
# 5: socket


def check_socket(path: Path) -> Check:
    """The socket path `serve` would use: length, a private directory of ours, and what is on it now."""
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        return failed(
            "socket",
            f"{path} is {len(os.fsencode(path))} bytes; Unix sockets allow {_MAX_SUN_PATH}",
            "set a shorter [server] socket (or --socket), e.g. under $XDG_RUNTIME_DIR",
        )
    directory = path.parent
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        parent = _existing_ancestor(directory)
        if not os.access(parent, os.W_OK | os.X_OK):
            return failed(
                "socket",
                f"{directory} does not exist and cannot be created ({parent} is not writable for this user)",
                "create it (mode 0700, owned by the agent's user) or set [server] socket elsewhere",
            )
        return passed("socket", f"{path}; {directory} will be created with mode 0700 when the agent starts")
    if not stat.S_ISDIR(st.st_mode):
        return failed("socket", f"{directory} is not a directory (or is a symlink)", "use a real directory, mode 0700")
    if st.st_uid != os.geteuid():
        return failed(
            "socket",
            f"{directory} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})",
            "run the agent as the directory's owner or set [server] socket in a directory of your own",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        return failed(
            "socket",
            f"{directory} has mode {mode:04o}; other users could reach the socket in it",
            f"chmod 700 {directory}",
        )
    return _check_socket_file(path, f"{directory} is yours, mode 0700")


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_socket_file(path: Path, dir_detail: str) -> Check:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return passed("socket", f"{path}; {dir_detail}; no agent running")
    if not stat.S_ISSOCK(st.st_mode):
        return failed("socket", f"{path} exists and is not a socket", f"move {path} away; the agent never replaces it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return failed(
                "socket",
                f"{path} is a stale socket file (nothing answers on it)",
                "remove it or just start the agent, which replaces it",
            )
        return failed("socket", f"cannot connect to {path}: {e.strerror}", "check its owner and mode (0600)")
    finally:
        probe.close()
    return _running_agent(path, dir_detail)


def _running_agent(path: Path, dir_detail: str) -> Check:
    from agent.client import AgentClient, AgentClientError

    try:
        with AgentClient(path, timeout=5.0) as client:
            health = client.health()
    except AgentClientError as e:
        return failed(
            "socket",
            f"something answers on {path} but not as the agent does ({e.code}: {e.message})",
            "find what listens there (ss -xlp) and stop it, or use another [server] socket",
        )
    try:
        parsed = AgentHealth.from_json(health)
    except (KeyError, TypeError, ValueError) as e:
        return failed(
            "socket",
            f"something answers on {path} but not as the agent does (health answer: {type(e).__name__}: {e})",
            "find what listens there (ss -xlp) and stop it, or use another [server] socket",
        )
    about = (
        f"an agent is running on it: status {parsed.status.value}, "
        f"token {parsed.identity.label!r} serial {parsed.identity.serial}"
    )
    if parsed.ok:
        return passed("socket", f"{path}; {dir_detail}; {about}")
    return failed(
        "socket",
        f"{path}: {about} ({parsed.reason or 'no reason given'})",
        "see the agent's log (journalctl -u dfns-agent); a rejected or locked PIN needs an operator, then a "
        "restart; a token fault recovers by itself once the device is back",
    )


# --------------------------------------------------------------------------------------------------
# 6: the rest of the config


def check_config_summary(config: Config) -> Check:
    """load_config already enforced structure and that rules name known credentials: this states it."""
    with_dfns = sum(1 for c in config.credentials if c.dfns is not None)
    rules = (
        f"{len(config.rules)} policy rule(s), all naming configured credentials"
        if config.rules
        else "no policy rules (only this uid and root may use the agent)"
    )
    detail = f"{config.path}: {len(config.credentials)} credential(s) ({with_dfns} with Dfns settings), {rules}"
    return passed("config", detail)


def check_pin_source(source: SecretSource) -> Check | None:
    """The PIN file's safety when the PIN step did not get to read it (e.g. the module was missing)."""
    if source.file is None:
        return None
    try:
        read_secret_file(source.file, "PIN")  # the same rules the agent applies; the value is dropped
    except SecretError as e:
        return failed("pin file", e.message, _secret_fix(source, "PIN", _PIN_KEYS, prompt=False))
    return passed("pin file", f"{source.file}, owner-only")


def check_audit(audit: AuditConfig) -> Check:
    """The audit log can be opened for appending, without writing a record."""
    from agent.paths import default_audit_path

    if not audit.enabled:
        return passed("audit log", "disabled ([audit] enabled = false)", "signatures will not be recorded")
    path = audit.file or default_audit_path()
    if path.exists():
        if not path.is_file():
            return failed("audit log", f"{path} is not a regular file", "set [audit] file to a file path")
        if not os.access(path, os.W_OK):
            return failed(
                "audit log",
                f"{path} is not writable by this user; the agent would refuse to sign",
                f"chown {path} to the agent's user (keep it mode 0600)",
            )
        return passed("audit log", f"{path} (writable)")
    parent = _existing_ancestor(path.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        return failed(
            "audit log",
            f"{path} cannot be created: {parent} is not writable by this user",
            f"create {path.parent} owned by the agent's user (mode 0700), or set [audit] file elsewhere",
        )
    return passed("audit log", f"{path} (will be created, mode 0600)")


def check_dfns_token(cred: CredentialConfig) -> Check:
    """The bearer token's source is there and safe; the token itself is read and dropped, never shown."""
    assert cred.dfns is not None
    name = f"dfns token {cred.name}"
    try:
        secret = read_secret(cred.dfns.token, what=f"Dfns token for credential {cred.name!r}", setting="dfns.token_")
    except SecretError as e:
        return failed(name, e.message, _secret_fix(cred.dfns.token, "Dfns token", _DFNS_KEYS, prompt=False))
    return passed(name, f"from {secret.source}")


# --------------------------------------------------------------------------------------------------
# 7: Dfns


def check_dfns_url(http: httpx.Client, cred_name: str, url: str) -> Check:
    """Any HTTP answer proves DNS, routing, proxy and TLS work; no token is sent."""
    name = f"dfns {cred_name}"
    try:
        r = http.get(url)
    except httpx.TimeoutException:
        problem = f"{url} did not answer within {_DFNS_TIMEOUT:g} s"
    except httpx.HTTPError as e:
        problem = f"cannot reach {url}: {type(e).__name__}: {e}"
    else:
        return passed(name, f"{url} answered HTTP {r.status_code} (reachable)")
    return failed(
        name,
        problem,
        f"check DNS (getent hosts {urlsplit(url).hostname}) and the route from this machine; behind a proxy set "
        "HTTPS_PROXY (and NO_PROXY for local hosts) in the agent's environment; for TLS errors behind an "
        "inspecting proxy point SSL_CERT_FILE at its CA bundle; under systemd the unit's RestrictAddressFamilies= "
        "must include AF_INET and AF_INET6 (and IPAddressDeny= must not block the host)",
    )
