"""Per-token settings of issue 11: concurrency (serial for modules known to need it), key-generation template
and keys that allow more than signing, as parsed from [token] and as the token decides them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import KeygenTemplate, TokenConcurrency, TokenConfig, load_config
from agent.errors import ConfigError
from agent.token.device import _serial
from agent.token.module import LoadedModule


def _loaded(manufacturer: str, *, os_locking: bool = True) -> LoadedModule:
    # raw stands in for "we reached the module's one instance"; no entry point is called here
    return LoadedModule("/m.so", None, object() if os_locking else None, manufacturer, "")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("manufacturer", "os_locking", "serial"),
    [
        ("SoftHSM".ljust(32), True, False),
        ("tpm2-software.github.io".ljust(32), True, True),  # ESYS: one thread at a time
        ("PKCS#11 Kit".ljust(32), False, False),  # a new instance per caller, locks by itself
        ("Some Vendor", False, True),  # a per-call instance we could not give locking to
    ],
)
def test_auto_concurrency(manufacturer: str, os_locking: bool, serial: bool) -> None:
    assert _serial(TokenConfig(module="/m.so", label="t"), _loaded(manufacturer, os_locking=os_locking)) is serial


def test_configured_concurrency_wins() -> None:
    tpm = _loaded("tpm2-software.github.io")
    assert not _serial(TokenConfig(module="/m.so", label="t", concurrency=TokenConcurrency.PARALLEL), tpm)
    soft = _loaded("SoftHSM")
    assert _serial(TokenConfig(module="/m.so", label="t", concurrency=TokenConcurrency.SERIAL), soft)


def _config(tmp_path: Path, token_extra: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[token]\nmodule = "/m.so"\nlabel = "t"\n{token_extra}[token.pin]\nenv = "PIN"\n'
        '[[credential]]\nname = "a"\nkey = "k"\n'
    )
    return path


def test_token_settings_are_parsed(tmp_path: Path) -> None:
    extra = (
        'concurrency = "serial"\nmax_sessions = 16\nkeygen_template = "module"\nallow_other_usages = true\n'
        "sign_timeout = 2.5\nstuck_limit = 30\n"
    )
    t = load_config(_config(tmp_path, extra)).token
    assert t.concurrency is TokenConcurrency.SERIAL and t.max_sessions == 16
    assert t.keygen_template is KeygenTemplate.MODULE and t.allow_other_usages
    assert t.sign_timeout == 2.5 and t.stuck_limit == 30.0
    d = load_config(_config(tmp_path, "")).token
    assert d.concurrency is TokenConcurrency.AUTO and d.keygen_template is KeygenTemplate.SIGN_ONLY
    assert not d.allow_other_usages and d.sign_timeout == 10.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('concurrency = "fast"\n', "'concurrency' must be one of 'auto', 'parallel', 'serial'"),
        ('keygen_template = "any"\n', "'keygen_template' must be one of 'sign-only', 'module'"),
        ('allow_other_usages = "yes"\n', "'allow_other_usages' must be true or false"),
        ("sign_timeout = -1\n", "'sign_timeout' must be a number"),
    ],
)
def test_bad_token_settings_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, extra))
    assert message in e.value.message
