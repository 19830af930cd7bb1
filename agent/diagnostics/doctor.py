"""``dfns-agent doctor``: check, in the order the agent itself needs them, everything start-up depends on.

Most failures users hit are environmental (a wrong module path, a re-initialized token, a group-readable
PIN file, a stale socket, a proxy or a systemd sandbox in the way of Dfns), and the agent can only report
the first one it trips over. The doctor walks the whole chain and yields one result per check, with the
fix for each failure, so one run shows everything that needs attention. It never prints: rendering is
``agent/cli/doctor.py``'s.

It is careful in the ways the agent is: the PIN is tried at most once, neither the PIN nor a Dfns bearer
token is ever part of a result (a token is sent only to its credential's Dfns, in one read-only call), and
nothing is written (no socket is bound, no audit record is made). Checks that cannot run because one they
depend on failed (module → token → PIN → keys) are skipped, not failed. The checks themselves live in
``agent/diagnostics/*_checks.py`` and ``dfns_check.py``.

PKCS#11 modules are loaded once per process (``agent/token/module.py`` caches them by path), so the doctor
is meant to run in its own process, as the CLI command does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.config import Config, CredentialConfig
from agent.diagnostics.config_checks import check_config_summary, load
from agent.diagnostics.dfns_check import check_dfns_url, dfns_http_client
from agent.diagnostics.path_checks import (
    WritePath,
    check_audit,
    check_audit_in_unit,
    check_sandbox,
    check_socket,
    softhsm_token_dir,
)
from agent.diagnostics.results import Check, failed, skipped
from agent.diagnostics.secret_checks import check_pin_source, read_dfns_token
from agent.diagnostics.token_checks import (
    PinResult,
    check_checkpoint_key,
    check_credentials_present,
    check_key,
    check_module,
    check_pin,
    check_token,
)
from agent.secret import Secret
from agent.token import Token

if TYPE_CHECKING:
    from agent.diagnostics.unit import UnitSettings

R = TypeVar("R")

_NO_PERMISSION = (
    "run the doctor as the agent's user, or for a systemd service as root with --unit "
    "(sudo dfns-agent --config FILE doctor --unit dfns-agent.service), which checks as the service will run"
)
_REPORT_BUG = "an unexpected failure in this check; if the message does not explain it, report it with this output"


def run(
    config_path: str | None,
    *,
    socket_override: str | None = None,
    socket_unit: str | None = None,
    unit: UnitSettings | None = None,
) -> Generator[Check, None, None]:
    """Every check, each yielded as soon as it finishes (the network checks can take seconds).
    ``socket_unit``: the socket is that systemd socket unit's (it makes the directory and the file).
    ``unit``: the systemd service the checks stand in for; the doctor runs outside its mount namespace, so
    what its sandbox (``ProtectSystem=``) keeps read-only is checked from its settings as well.

    Iterate to the end or close the generator: the token logged in for the key checks is logged out then.
    """
    loaded = load(config_path)
    if loaded.config is None:
        assert loaded.problem is not None
        yield loaded.problem
        return
    config = loaded.config
    token: Token | None = None
    try:
        # 1-3: module, token, PIN; each needs the one before.
        lib, check = _attempt("module", lambda: check_module(config.token), _nothing)
        yield check
        p11_token: Any = None
        if lib is None:
            yield skipped("token", "module")
        else:
            p11_token, check = _attempt("token", lambda: check_token(lib, config.token), _nothing)
            yield check
        pin = PinResult(skipped("pin", "module" if lib is None else "token"))
        if p11_token is not None:
            pin = _attempt("pin", lambda: check_pin(config.token, p11_token), PinResult)
        token = pin.token
        yield pin.check
        # 4: keys.
        if token is None:
            yield skipped("keys", "pin" if p11_token is not None else "module" if lib is None else "token")
        else:
            yield from _key_checks(config, token)
            checkpoint = _attempt("checkpoint key", partial(check_checkpoint_key, config, token), _same)
            if checkpoint is not None:
                yield checkpoint
        # 5: socket.
        yield _safely("socket", lambda: check_socket(_socket_path(config, socket_override), managed_by=socket_unit))
        # 6: the rest of the config.
        yield _safely("config", lambda: check_config_summary(config))
        if not pin.source_checked:
            pin_source = _attempt("pin file", lambda: check_pin_source(config.token.pin), _same)
            if pin_source is not None:
                yield pin_source
        audit = _safely("audit log", lambda: check_audit(config.audit))
        if unit is not None and not audit.failed:
            audit = _attempt("audit log", partial(check_audit_in_unit, config.audit, unit.sandbox), _same) or audit
        yield audit
        if unit is not None:
            yield _safely("sandbox", partial(_check_unit_writes, config, unit, socket_override, socket_unit))
        tokens: dict[str, Secret] = {}  # credential name -> its Dfns token, for check 7 only
        for cred in config.credentials:
            if cred.dfns is not None:
                yield _safely(f"dfns token {cred.name}", partial(_read_token, cred, tokens))
        # 7: Dfns, only for credentials that talk to it; with their tokens when they could be read.
        yield from _dfns_checks(config, tokens)
    finally:
        if token is not None:
            token.close()  # logs out


def _key_checks(config: Config, token: Token) -> Iterator[Check]:
    missing = check_credentials_present(config)
    if missing is not None:
        yield missing
    for cred in config.credentials:
        yield _safely(f"key {cred.name}", partial(check_key, token, cred))


def _read_token(cred: CredentialConfig, tokens: dict[str, Secret]) -> Check:
    check, token = read_dfns_token(cred)
    if token is not None:
        tokens[cred.name] = token
    return check


def _dfns_checks(config: Config, tokens: dict[str, Secret]) -> Iterator[Check]:
    creds = [c for c in config.credentials if c.dfns is not None]
    if not creds:
        return
    # One request per distinct URL and token source: a dead host should cost its timeout once.
    answers: dict[tuple[str, str | None], Check] = {}
    with dfns_http_client() as http:
        for cred in creds:
            assert cred.dfns is not None
            url, token = cred.dfns.base_url, tokens.get(cred.name)
            key = (url, token.source if token is not None else None)
            if key in answers:
                yield replace(answers[key], name=f"dfns {cred.name}", warnings=())
            else:
                answers[key] = _safely(f"dfns {cred.name}", partial(check_dfns_url, http, cred.name, url, token))
                yield answers[key]


def _check_unit_writes(
    config: Config, unit: UnitSettings, socket_override: str | None, socket_unit: str | None
) -> Check:
    """Every directory the agent writes in besides the audit log's, against the unit's sandbox."""
    from agent.paths import default_audit_path

    writes = [WritePath(default_audit_path().parent, "reload status")]
    if socket_unit is None:  # no socket unit holds it: the agent binds the socket itself
        writes.append(WritePath(_socket_path(config, socket_override).parent, "socket"))
    tokens = softhsm_token_dir(config.token, unit.environment)
    if tokens is not None:
        writes.append(WritePath(tokens, "SoftHSM tokens"))
    return check_sandbox(unit.sandbox, writes)


def _socket_path(config: Config, override: str | None) -> Path:
    from agent.paths import socket_path_for  # the same rule `serve` uses

    return Path(os.path.abspath(socket_path_for(config, override)))


def _attempt(name: str, fn: Callable[[], R], on_error: Callable[[Check], R]) -> R:
    """Run one check; an unexpected exception fails that check (``on_error`` wraps it), not the whole run."""
    try:
        return fn()
    except PermissionError as e:
        where = f" {e.filename}" if e.filename else ""
        return on_error(failed(name, f"permission denied{where}", _NO_PERMISSION))
    except Exception as e:  # noqa: BLE001 - a doctor must report, not crash
        text = getattr(e, "message", None) or str(e) or type(e).__name__
        return on_error(failed(name, f"unexpected error: {type(e).__name__}: {text}", _REPORT_BUG))


def _safely(name: str, fn: Callable[[], Check]) -> Check:
    return _attempt(name, fn, lambda check: check)


def _same(check: Check) -> Check | None:
    return check


def _nothing(check: Check) -> tuple[None, Check]:
    return None, check
