"""The agent's TOML configuration: which module, which token, where the PIN comes from, which keys are
which Dfns credentials, and where the socket lives.

Only the *path* of this file may come from the environment (``DFNS_AGENT_CONFIG``); every setting lives in
the file so that a service manager, a shell and ``sudo`` all see the same agent. Unknown keys are errors:
a typo in a security setting must not be silently ignored.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from agent.caller import Caller
from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_ENV = "DFNS_AGENT_CONFIG"
DEFAULT_MAX_BODY = 64 * 1024
MAX_BODY_LIMIT = 16 * 1024 * 1024  # the largest max_body_bytes may be: no agent reads a longer body
CREDENTIAL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(CREDENTIAL_NAME_PATTERN)
NAME_RULE = "1-64 characters of letters, digits, '.', '_', '-'"


def is_credential_name(name: str) -> bool:
    """Whether ``name`` can name a credential at all (a request naming anything else is refused unread)."""
    return _NAME_RE.fullmatch(name) is not None


_CRED_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,512}={0,2}$")


@dataclass(frozen=True)
class SecretSource:
    """Where a secret comes from, in order of preference: file, systemd credential, env var, prompt."""

    file: Path | None = None
    credential: str | None = "pin"
    env: str | None = None
    prompt: bool = True


@dataclass(frozen=True)
class TokenConfig:
    module: str
    label: str | None = None
    serial: str | None = None
    module_env: Mapping[str, str] = field(default_factory=dict)
    pin: SecretSource = field(default_factory=SecretSource)
    probe_interval: float = 10.0
    # Bounded time on the token: a signature not back after sign_timeout seconds gets 504 token_timeout and
    # opens the circuit; a token call still stuck after stuck_limit seconds means the process is wedged
    # (watchdog pings stop; a worker exits to be replaced). 0 turns either off.
    sign_timeout: float = 10.0
    stuck_limit: float = 60.0
    # How the module may be called (README "PKCS#11 modules"): auto picks serial for modules known to fail
    # with two threads inside (tpm2-pkcs11); max_sessions bounds the sessions open for signing (0: no bound).
    concurrency: TokenConcurrency = field(default_factory=lambda: TokenConcurrency.AUTO)
    max_sessions: int = 0
    # Key generation template: sign-only by default; "module" leaves usages to the module (tpm2-pkcs11
    # rejects CKA_DECRYPT/CKA_ENCRYPT = FALSE). Keys allowing more than signing are refused unless
    # allow_other_usages is true.
    keygen_template: KeygenTemplate = field(default_factory=lambda: KeygenTemplate.SIGN_ONLY)
    allow_other_usages: bool = False


class TokenConcurrency(str, Enum):
    AUTO = "auto"
    PARALLEL = "parallel"
    SERIAL = "serial"


class KeygenTemplate(str, Enum):
    SIGN_ONLY = "sign-only"
    MODULE = "module"


@dataclass(frozen=True)
class ServerConfig:
    socket: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    sign_threads: int = 8
    workers: int = 1
    max_connections: int = 256
    max_connections_per_uid: int = 128  # per worker; one caller's idle connections cannot lock others out
    idle_timeout: float = 15.0
    body_timeout: float = 10.0
    shutdown_timeout: float = 10.0


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True)
class AuditConfig:
    """The tamper-evident audit log; ``file`` None means the default path (see ``agent/paths.py``)."""

    enabled: bool = True
    file: Path | None = None
    # Signed checkpoints (agent/core/checkpoint.py): the label of a dedicated Ed25519 or P-256 key on the
    # token (none: no checkpoints), the note's origin (also its key name; None: "<hostname>/dfns-agent/audit"),
    # and how often: every so many records, and every so many seconds when there are new records.
    checkpoint_key: str | None = None
    checkpoint_origin: str | None = None
    checkpoint_every: int = 1000
    checkpoint_interval: float = 60.0
    # Rotation: a new file once the current one reaches this size (0: never) or this age in seconds (0: never).
    rotate_bytes: int = 64 * 1024 * 1024
    rotate_age: float = 0.0
    # Refusals from one caller for one reason are recorded once per interval, with a count (agent/core/refusals.py).
    refusal_interval: float = 60.0


@dataclass(frozen=True)
class Rule:
    """One ``[[policy.rule]]``: which callers it selects and what they may do (see ``agent/core/policy.py``)."""

    name: str
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    exes: tuple[str, ...] = ()
    credentials: frozenset[str] | None = None
    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None
    allow_sign: bool | None = None
    allow_register: bool = False
    rate: float | None = None
    burst: int | None = None

    def matches(self, caller: Caller) -> bool:
        selectors = []
        if self.uids:
            selectors.append(caller.uid in self.uids)
        if self.gids:
            selectors.append(caller.gid in self.gids)
        if self.exes:
            selectors.append(caller.exe is not None and caller.exe in self.exes)
        return bool(selectors) and all(selectors)

    @property
    def sign_allowed(self) -> bool:
        if self.allow_sign is not None:
            return self.allow_sign
        return self.methods is None and self.paths is None


DEFAULT_DFNS_URL = "https://api.dfns.io"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class DfnsConfig:
    """How the agent reaches Dfns for one credential (only needed for /v1/user-action and /v1/request)."""

    base_url: str = DEFAULT_DFNS_URL
    token: SecretSource = field(default_factory=lambda: SecretSource(credential="dfns-token", prompt=False))
    timeout: float = 30.0
    connect_timeout: float = 5.0
    retries: int = 3


@dataclass(frozen=True)
class CredentialConfig:
    """A Dfns Key credential backed by a key on the token."""

    name: str
    key: str
    key_id: bytes | None = None
    cred_id: str | None = None
    origin: str | None = None
    dfns: DfnsConfig | None = None


@dataclass(frozen=True)
class Config:
    token: TokenConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    credentials: tuple[CredentialConfig, ...] = ()
    rules: tuple[Rule, ...] = ()
    audit: AuditConfig = field(default_factory=AuditConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    path: Path | None = None

    def credential(self, name: str) -> CredentialConfig | None:
        return next((c for c in self.credentials if c.name == name), None)


def as_reloaded(running: Config, fresh: Config) -> tuple[Config, tuple[str, ...]]:
    """What a reload (SIGHUP) applies: ``fresh`` with the sections only a restart can change kept from
    ``running`` (the token session; the socket and its limits; the audit log, one chain that every worker
    appends to; the logging set up before the workers fork), and the names of those that differ."""
    changed = tuple(
        name
        for name, old, new in (
            ("token", running.token, fresh.token),
            ("server", running.server, fresh.server),
            ("audit", running.audit, fresh.audit),
            ("logging", running.logging, fresh.logging),
        )
        if old != new
    )
    kept = replace(fresh, token=running.token, server=running.server, audit=running.audit, logging=running.logging)
    return kept, changed


def default_config_paths() -> list[Path]:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(xdg) / "dfns-agent" / "agent.toml", Path("/etc/dfns-agent/agent.toml")]


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: ``--config``, else ``$DFNS_AGENT_CONFIG``, else the first default that exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    for candidate in default_config_paths():
        if candidate.exists():
            return candidate
    tried = ", ".join(str(p) for p in default_config_paths())
    raise ConfigError(f"no configuration file: pass --config, set {CONFIG_ENV}, or create one of: {tried}")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    return read_config(path)[0]


def read_config(path: str | os.PathLike[str] | None = None) -> tuple[Config, bytes]:
    """The config and the exact text it was parsed from (what a reload hands its workers: they apply that
    text, not whatever the file holds when each of them gets to it)."""
    p = find_config(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {p}: {e.strerror}") from None
    return config_from_text(raw, p), raw


def config_from_text(raw: bytes, path: str | os.PathLike[str]) -> Config:
    """Parse ``raw`` as the contents of the config file ``path``: relative paths in it are taken relative to
    that file's folder, and messages name it."""
    p = Path(path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    p = Path(os.path.abspath(p))
    return parse_config(data, base=p.parent, path=p)


def parse_config(data: Mapping[str, Any], *, base: Path, path: Path | None = None) -> Config:
    """Validate a parsed TOML document; relative paths are taken relative to ``base`` (the file's folder)."""
    where = str(path) if path else "config"
    _only(data, {"token", "server", "credential", "policy", "audit", "logging"}, where)
    token = _token(_table(data, "token", where, required=True), base, f"{where}: [token]")
    server = _server(_table(data, "server", where), base, f"{where}: [server]")
    rules = _policy(_table(data, "policy", where), f"{where}: [policy]")
    audit = _audit(_table(data, "audit", where), base, f"{where}: [audit]")
    logging_cfg = _logging(_table(data, "logging", where), f"{where}: [logging]")
    creds_raw = data.get("credential", [])
    if not isinstance(creds_raw, list):
        raise ConfigError(f"{where}: credentials are written as [[credential]] tables")
    creds = tuple(_credential(c, base, f"{where}: [[credential]] #{i + 1}") for i, c in enumerate(creds_raw))
    names = [c.name for c in creds]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: credential names must be unique; repeated: {', '.join(dupes)}")
    known = {c.name for c in creds}
    for rule in rules:
        unknown = sorted((rule.credentials or frozenset()) - known)
        if unknown:
            raise ConfigError(f"{where}: policy rule {rule.name!r} names unknown credential(s) {', '.join(unknown)}")
    return Config(
        token=token, server=server, credentials=creds, rules=rules, audit=audit, logging=logging_cfg, path=path
    )


def _token(t: Mapping[str, Any], base: Path, where: str) -> TokenConfig:
    _only(t, {"module", "label", "serial", "module_env", "pin", "probe_interval", *_TOKEN_LIMITS, *_TOKEN_MODES}, where)
    module = _str(t, "module", where, required=True)
    label = _str(t, "label", where)
    serial = _str(t, "serial", where)
    if label is None and serial is None:
        # both may be set (both must match): some modules give every token one serial (opencryptoki "123",
        # tpm2-pkcs11 "0000000000000000"), some let two tokens share a label
        raise ConfigError(f"{where}: set 'label' or 'serial' (or both) to select the token")
    if not os.path.isabs(module):
        # dlopen would search the loader's path for it: which library runs would depend on the environment
        raise ConfigError(
            f"{where}: 'module' {module!r} is a relative path; give the PKCS#11 module's absolute path "
            "(e.g. /usr/lib/softhsm/libsofthsm2.so)"
        )
    env = t.get("module_env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{where}: 'module_env' must be a table of strings")
    pin_t = _table(t, "pin", where)
    _only(pin_t, {"file", "credential", "env", "prompt"}, f"{where}.pin")
    pin_file = _str(pin_t, "file", f"{where}.pin")
    prompt = pin_t.get("prompt", True)
    if not isinstance(prompt, bool):
        raise ConfigError(f"{where}.pin: 'prompt' must be true or false")
    pin = SecretSource(
        file=_path(pin_file, base) if pin_file else None,
        credential=_str(pin_t, "credential", f"{where}.pin") or "pin",
        env=_str(pin_t, "env", f"{where}.pin"),
        prompt=prompt,
    )
    probe = _number(t, "probe_interval", where, 10.0, lo=0.5, hi=3600.0)
    limits = {name: _number(t, name, where, default, lo=0.0, hi=3600.0) for name, default in _TOKEN_LIMITS.items()}
    concurrency = _choice(t, "concurrency", where, TokenConcurrency, TokenConcurrency.AUTO)
    template = _choice(t, "keygen_template", where, KeygenTemplate, KeygenTemplate.SIGN_ONLY)
    other = t.get("allow_other_usages", False)
    if not isinstance(other, bool):
        raise ConfigError(f"{where}: 'allow_other_usages' must be true or false")
    return TokenConfig(
        module=module,
        label=label,
        serial=serial,
        module_env=env,
        pin=pin,
        probe_interval=probe,
        **limits,
        concurrency=concurrency,
        max_sessions=_int(t, "max_sessions", where, 0, lo=0, hi=4096),
        keygen_template=template,
        allow_other_usages=other,
    )


_TOKEN_LIMITS = {"sign_timeout": 10.0, "stuck_limit": 60.0}
_TOKEN_MODES = ("concurrency", "max_sessions", "keygen_template", "allow_other_usages")
_E = TypeVar("_E", bound=Enum)


def _choice(t: Mapping[str, Any], key: str, where: str, kind: type[_E], default: _E) -> _E:
    v = t.get(key, default.value)
    try:
        return kind(v)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"{where}: '{key}' must be one of {allowed}") from None


def _server(s: Mapping[str, Any], base: Path, where: str) -> ServerConfig:
    _only(
        s,
        {
            "socket",
            "max_body_bytes",
            "sign_threads",
            "workers",
            "max_connections",
            "max_connections_per_uid",
            "idle_timeout",
            "body_timeout",
            "shutdown_timeout",
        },
        where,
    )
    sock = _str(s, "socket", where)
    return ServerConfig(
        socket=_path(sock, base) if sock else None,
        max_body_bytes=_int(s, "max_body_bytes", where, DEFAULT_MAX_BODY, lo=1024, hi=MAX_BODY_LIMIT),
        sign_threads=_int(s, "sign_threads", where, ServerConfig.sign_threads, lo=0, hi=256),
        workers=_int(s, "workers", where, 1, lo=1, hi=64),
        max_connections=_int(s, "max_connections", where, 256, lo=1, hi=65536),
        max_connections_per_uid=_int(s, "max_connections_per_uid", where, 128, lo=1, hi=65536),
        idle_timeout=_number(s, "idle_timeout", where, 15.0, lo=0.1, hi=3600.0),
        body_timeout=_number(s, "body_timeout", where, 10.0, lo=0.1, hi=600.0),
        # At least 0.1 s: a request being signed when SIGTERM arrives gets its answer.
        shutdown_timeout=_number(s, "shutdown_timeout", where, 10.0, lo=0.1, hi=600.0),
    )


def _logging(t: Mapping[str, Any], where: str) -> LoggingConfig:
    _only(t, {"format", "level"}, where)
    fmt = t.get("format", "text")
    level = t.get("level", "info")
    if fmt not in ("text", "json"):
        raise ConfigError(f'{where}: \'format\' must be "text" or "json"')
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{where}: 'level' must be one of debug, info, warning, error")
    return LoggingConfig(format=fmt, level=level)


def _audit(a: Mapping[str, Any], base: Path, where: str) -> AuditConfig:
    _only(
        a,
        {
            "enabled", "file", "checkpoint_key", "checkpoint_origin", "checkpoint_every", "checkpoint_interval",
            "rotate_bytes", "rotate_age", "refusal_interval",
        },
        where,
    )  # fmt: skip
    enabled = a.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: 'enabled' must be true or false")
    file = _str(a, "file", where)
    origin = _str(a, "checkpoint_origin", where)
    if origin is not None and (not origin or any(c.isspace() or c == "+" or ord(c) < 0x20 for c in origin)):
        raise ConfigError(f"{where}: 'checkpoint_origin' must be non-empty, without spaces or '+'")
    defaults = AuditConfig()

    def number(key: str, default: float, *, integer: bool = False) -> Any:
        value = a.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value < 0:
            kind = "a whole number" if integer else "a number"
            raise ConfigError(f"{where}: '{key}' must be {kind} >= 0")
        return value

    refusal_interval = number("refusal_interval", defaults.refusal_interval)
    if refusal_interval <= 0:
        raise ConfigError(f"{where}: 'refusal_interval' must be > 0")
    return AuditConfig(
        enabled=enabled,
        file=_path(file, base) if file else None,
        checkpoint_key=_str(a, "checkpoint_key", where) or None,
        checkpoint_origin=origin,
        checkpoint_every=number("checkpoint_every", defaults.checkpoint_every, integer=True),
        checkpoint_interval=float(number("checkpoint_interval", defaults.checkpoint_interval)),
        rotate_bytes=number("rotate_bytes", defaults.rotate_bytes, integer=True),
        rotate_age=float(number("rotate_age", defaults.rotate_age)),
        refusal_interval=float(refusal_interval),
    )


def _policy(p: Mapping[str, Any], where: str) -> tuple[Rule, ...]:
    _only(p, {"rule"}, where)
    raw = p.get("rule", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: rules are written as [[policy.rule]] tables")
    rules = tuple(_rule(r, f"{where} rule #{i + 1}") for i, r in enumerate(raw))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: policy rule names must be unique")
    return rules


def _rule(r: Any, where: str) -> Rule:
    if not isinstance(r, dict):
        raise ConfigError(f"{where}: must be a table")
    _only(
        r,
        {
            "name",
            "uids",
            "gids",
            "exes",
            "credentials",
            "methods",
            "paths",
            "allow_sign",
            "allow_register",
            "rate",
            "burst",
        },
        where,
    )
    name = _str(r, "name", where, required=True)
    uids, gids = _int_list(r, "uids", where), _int_list(r, "gids", where)
    exes = _str_list(r, "exes", where)
    if not (uids or gids or exes):
        raise ConfigError(f"{where}: rule {name!r} must select callers with uids, gids and/or exes")
    if exes and not (uids or gids):
        # Any local user can run any readable program under its own control (LD_PRELOAD, ptrace of its own
        # process), so an executable alone never tells who is asking (README, "What an exes rule guarantees").
        raise ConfigError(
            f"{where}: rule {name!r} selects callers by executable only; add the uids (or gids) that run it: "
            "any local user can run that program and make it send what it likes"
        )
    creds, methods, paths = (
        _str_list(r, "credentials", where),
        _str_list(r, "methods", where),
        _str_list(r, "paths", where),
    )
    for flag in ("allow_sign", "allow_register"):
        if flag in r and not isinstance(r[flag], bool):
            raise ConfigError(f"{where}: '{flag}' must be true or false")
    rate = _number(r, "rate", where, 0.0, lo=0.001, hi=1e6) if "rate" in r else None
    burst = _int(r, "burst", where, 1, lo=1, hi=1_000_000) if "burst" in r else None
    return Rule(
        name=name,
        uids=frozenset(uids or ()),
        gids=frozenset(gids or ()),
        exes=tuple(exes or ()),
        credentials=frozenset(creds) if creds is not None else None,
        methods=frozenset(m.upper() for m in methods) if methods is not None else None,
        paths=tuple(paths) if paths is not None else None,
        allow_sign=r.get("allow_sign"),
        allow_register=bool(r.get("allow_register", False)),
        rate=rate,
        burst=burst,
    )


def _int_list(t: Mapping[str, Any], key: str, where: str) -> list[int] | None:
    v = t.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ConfigError(f"{where}: '{key}' must be a list of non-negative integers")
    return v


def _str_list(t: Mapping[str, Any], key: str, where: str) -> list[str] | None:
    v = t.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{where}: '{key}' must be a list of non-empty strings")
    return v


def _credential(c: Any, base: Path, where: str) -> CredentialConfig:
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: must be a table")
    _only(c, {"name", "key", "key_id", "cred_id", "origin", "dfns"}, where)
    name = _str(c, "name", where, required=True)
    if not is_credential_name(name):
        raise ConfigError(f"{where}: name {name!r} must be {NAME_RULE}")
    key_id_hex = _str(c, "key_id", where)
    try:
        key_id = bytes.fromhex(key_id_hex) if key_id_hex else None
    except ValueError:
        raise ConfigError(f"{where}: key_id must be hex (the key's CKA_ID)") from None
    cred_id = _str(c, "cred_id", where)
    if cred_id is not None and not _CRED_ID_RE.fullmatch(cred_id):
        raise ConfigError(f"{where}: cred_id must be the base64url credential id Dfns lists in allowCredentials")
    origin = _str(c, "origin", where)
    dfns = _dfns(c["dfns"], base, f"{where}.dfns") if "dfns" in c else None
    return CredentialConfig(
        name=name, key=_str(c, "key", where, required=True), key_id=key_id, cred_id=cred_id, origin=origin, dfns=dfns
    )


def _dfns(d: Any, base: Path, where: str) -> DfnsConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be a table")
    _only(
        d, {"base_url", "token_file", "token_credential", "token_env", "timeout", "connect_timeout", "retries"}, where
    )
    url = _str(d, "base_url", where) or DEFAULT_DFNS_URL
    parsed = urlsplit(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname or parsed.query or parsed.fragment:
        raise ConfigError(f"{where}: base_url {url!r} must be an http(s) URL like {DEFAULT_DFNS_URL}")
    if parsed.scheme == "http" and parsed.hostname not in _LOOPBACK_HOSTS:
        raise ConfigError(f"{where}: base_url {url!r} would send the bearer token in clear text; use https")
    token_file = _str(d, "token_file", where)
    token = SecretSource(
        file=_path(token_file, base) if token_file else None,
        credential=_str(d, "token_credential", where) or "dfns-token",
        env=_str(d, "token_env", where),
        prompt=False,
    )
    return DfnsConfig(
        base_url=url.rstrip("/"),
        token=token,
        timeout=_number(d, "timeout", where, 30.0, lo=0.1, hi=600.0),
        connect_timeout=_number(d, "connect_timeout", where, 5.0, lo=0.1, hi=120.0),
        retries=_int(d, "retries", where, 3, lo=0, hi=10),
    )


def _only(t: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(t) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _table(t: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> Mapping[str, Any]:
    v = t.get(key)
    if v is None:
        if required:
            raise ConfigError(f"{where}: missing [{key}] table")
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: '{key}' must be a table")
    return v


def _str(t: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> Any:
    v = t.get(key)
    if v is None:
        if required:
            raise ConfigError(f"{where}: missing '{key}'")
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    return v


def _int(t: Mapping[str, Any], key: str, where: str, default: int, *, lo: int, hi: int) -> int:
    v = t.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{where}: '{key}' must be an integer from {lo} to {hi}")
    return v


def _number(t: Mapping[str, Any], key: str, where: str, default: float, *, lo: float, hi: float) -> float:
    v = t.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{where}: '{key}' must be a number from {lo} to {hi}")
    return float(v)


def _path(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)
