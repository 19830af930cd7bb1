"""Tests for agent.config (TOML configuration) and agent.secret (PIN and token sources)."""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

from agent.config import (
    CONFIG_ENV,
    DEFAULT_MAX_BODY,
    Config,
    CredentialConfig,
    SecretSource,
    ServerConfig,
    TokenConfig,
    config_from_text,
    find_config,
    load_config,
    parse_config,
)
from agent.dev.testing import ROOT
from agent.errors import ConfigError, SecretError
from agent.secret import Secret, read_pin, read_secret, read_secret_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FULL_TOML = """\
[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "dfns-token"
module_env = { SOFTHSM2_CONF = "/etc/softhsm/softhsm2.conf" }

[token.pin]
file = "secrets/pin"
credential = "hsm-pin"
env = "DFNS_AGENT_PIN"
prompt = false

[server]
socket = "run/agent.sock"
max_body_bytes = 131072
sign_threads = 8

[[credential]]
name = "ops-signer"
key = "dfns-ops"
key_id = "0a1B"
cred_id = "Y2ktM3E5Y2MtbXFoM20tODdiOW1jNDZqZ2gxYWJqbA"
origin = "https://app.dfns.io"

[[credential]]
name = "backup_key.2"
key = "dfns-backup"
"""

MINIMAL_TOKEN = """\
[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "dfns-token"
"""


def write_config(folder: Path, text: str, name: str = "agent.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def parse_text(text: str, base: Path = Path("/cfg")) -> Config:
    return parse_config(tomllib.loads(textwrap.dedent(text)), base=base)


# --------------------------------------------------------------------------------------------------------------
# parse_config / load_config: valid files
# --------------------------------------------------------------------------------------------------------------


def test_load_full_config(tmp_path: Path) -> None:
    folder = tmp_path / "etc" / "dfns-agent"
    path = write_config(folder, FULL_TOML)
    cfg = load_config(path)

    assert cfg.path == path
    assert cfg.token == TokenConfig(
        module="/usr/lib/softhsm/libsofthsm2.so",
        label="dfns-token",
        serial=None,
        module_env={"SOFTHSM2_CONF": "/etc/softhsm/softhsm2.conf"},
        pin=SecretSource(file=folder / "secrets" / "pin", credential="hsm-pin", env="DFNS_AGENT_PIN", prompt=False),
    )
    assert cfg.server == ServerConfig(socket=folder / "run" / "agent.sock", max_body_bytes=131072, sign_threads=8)
    assert cfg.credentials == (
        CredentialConfig(
            name="ops-signer",
            key="dfns-ops",
            key_id=b"\x0a\x1b",
            cred_id="Y2ktM3E5Y2MtbXFoM20tODdiOW1jNDZqZ2gxYWJqbA",
            origin="https://app.dfns.io",
        ),
        CredentialConfig(name="backup_key.2", key="dfns-backup"),
    )
    assert cfg.credential("backup_key.2") is cfg.credentials[1]
    assert cfg.credential("ops-signer") is cfg.credentials[0]
    assert cfg.credential("missing") is None


def test_relative_pin_file_resolved_against_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    path = write_config(folder, MINIMAL_TOKEN + '[token.pin]\nfile = "pin.txt"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.token.pin.file == folder / "pin.txt"
    assert cfg.token.pin.file.is_absolute()


def test_relative_pin_file_with_relative_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    write_config(folder, MINIMAL_TOKEN + '[token.pin]\nfile = "pin.txt"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("conf") / "agent.toml")
    assert cfg.token.pin.file is not None
    assert cfg.token.pin.file.resolve() == (folder / "pin.txt").resolve()


def test_absolute_pin_file_kept(tmp_path: Path) -> None:
    path = write_config(tmp_path / "conf", MINIMAL_TOKEN + '[token.pin]\nfile = "/run/secrets/pin"\n')
    assert load_config(path).token.pin.file == Path("/run/secrets/pin")


def test_minimal_config_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, MINIMAL_TOKEN))
    assert cfg.token.label == "dfns-token"
    assert cfg.token.serial is None
    assert dict(cfg.token.module_env) == {}
    assert cfg.token.pin == SecretSource(file=None, credential="pin", env=None, prompt=True)
    assert cfg.server == ServerConfig(socket=None, max_body_bytes=DEFAULT_MAX_BODY, sign_threads=8)
    assert cfg.credentials == ()


def test_serial_instead_of_label() -> None:
    cfg = parse_text('[token]\nmodule = "/m.so"\nserial = "0123456789abcdef"\n')
    assert cfg.token.serial == "0123456789abcdef"
    assert cfg.token.label is None


@pytest.mark.parametrize("threads", [1, 256])
def test_sign_threads_bounds_accepted(threads: int) -> None:
    assert parse_text(MINIMAL_TOKEN + f"[server]\nsign_threads = {threads}\n").server.sign_threads == threads


# --------------------------------------------------------------------------------------------------------------
# parse_config / load_config: errors
# --------------------------------------------------------------------------------------------------------------


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_text(text)
    assert info.value.code == "config_error"
    return info.value.message


def test_unknown_top_level_key() -> None:
    msg = config_error(MINIMAL_TOKEN.replace("[token]", "verbose = true\n[token]"))
    assert "unknown setting" in msg and "verbose" in msg


def test_unknown_key_in_token() -> None:
    msg = config_error(MINIMAL_TOKEN + 'slot = "0"\n')
    assert "[token]" in msg and "unknown setting" in msg and "slot" in msg


def test_unknown_key_in_token_pin() -> None:
    msg = config_error(MINIMAL_TOKEN + '[token.pin]\nvalue = "1234"\n')
    assert "pin" in msg and "unknown setting" in msg and "value" in msg


def test_unknown_key_in_server_and_credential() -> None:
    assert "port" in config_error(MINIMAL_TOKEN + "[server]\nport = 8080\n")
    assert "algorithm" in config_error(MINIMAL_TOKEN + '[[credential]]\nname = "a"\nkey = "k"\nalgorithm = "x"\n')


def test_both_label_and_serial() -> None:
    # both may be set, and must then both match: some modules give every token the same serial
    assert parse_text(MINIMAL_TOKEN + 'serial = "1234"\n').token.serial == "1234"


def test_neither_label_nor_serial() -> None:
    msg = config_error('[token]\nmodule = "m.so"\n')
    assert "set 'label' or 'serial' (or both)" in msg


def test_missing_module() -> None:
    msg = config_error('[token]\nlabel = "x"\n')
    assert "missing 'module'" in msg


def test_missing_token_table() -> None:
    assert "missing [token]" in config_error("[server]\nsign_threads = 2\n")


def test_empty_module_string() -> None:
    assert "'module' must be a non-empty string" in config_error('[token]\nmodule = ""\nlabel = "x"\n')


@pytest.mark.parametrize("key_id", ["xyz", "abc", "0g"])
def test_bad_key_id_hex(key_id: str) -> None:
    msg = config_error(MINIMAL_TOKEN + f'[[credential]]\nname = "a"\nkey = "k"\nkey_id = "{key_id}"\n')
    assert "key_id must be hex" in msg
    assert "#1" in msg


@pytest.mark.parametrize("name", ["-leading-dash", "has space", "slash/name", "a" * 65, "ünicode"])
def test_bad_credential_name(name: str) -> None:
    msg = config_error(MINIMAL_TOKEN + f'[[credential]]\nname = "{name}"\nkey = "k"\n')
    assert "name" in msg and repr(name) in msg


@pytest.mark.parametrize("field", ["name", "cred_id"])
def test_credential_name_or_cred_id_with_trailing_newline_rejected(field: str) -> None:
    values = {"name": "ops", "key": "k", "cred_id": "Y2ktMQ"}
    values[field] += "\n"
    with pytest.raises(ConfigError, match=field):
        parse_config({"token": {"module": "/m.so", "label": "l"}, "credential": [values]}, base=Path("/cfg"))


def test_bad_cred_id() -> None:
    msg = config_error(MINIMAL_TOKEN + '[[credential]]\nname = "a"\nkey = "k"\ncred_id = "not base64url!"\n')
    assert "cred_id" in msg


def test_credential_missing_key() -> None:
    assert "missing 'key'" in config_error(MINIMAL_TOKEN + '[[credential]]\nname = "a"\n')


def test_duplicate_credential_names() -> None:
    text = MINIMAL_TOKEN + "".join(f'[[credential]]\nname = "{n}"\nkey = "k{i}"\n' for i, n in enumerate("abab"))
    msg = config_error(text)
    assert "unique" in msg and "repeated: a, b" in msg


@pytest.mark.parametrize("threads", [-1, 257, 10_000])
def test_sign_threads_out_of_range(threads: int) -> None:
    msg = config_error(MINIMAL_TOKEN + f"[server]\nsign_threads = {threads}\n")
    assert "'sign_threads' must be an integer from 0 to 256" in msg


def test_sign_threads_zero_means_inline() -> None:
    cfg = parse_config(tomllib.loads(MINIMAL_TOKEN + "[server]\nsign_threads = 0\n"), base=Path("/"))
    assert cfg.server.sign_threads == 0


@pytest.mark.parametrize("value", ['"64k"', "true", "65536.0", "[65536]"])
def test_max_body_bytes_wrong_type(value: str) -> None:
    msg = config_error(MINIMAL_TOKEN + f"[server]\nmax_body_bytes = {value}\n")
    assert "'max_body_bytes' must be an integer" in msg


def test_max_body_bytes_out_of_range() -> None:
    assert "max_body_bytes" in config_error(MINIMAL_TOKEN + "[server]\nmax_body_bytes = 100\n")


def test_prompt_must_be_bool() -> None:
    assert "'prompt' must be true or false" in config_error(MINIMAL_TOKEN + '[token.pin]\nprompt = "yes"\n')


def test_module_env_must_be_table_of_strings() -> None:
    assert "module_env" in config_error(MINIMAL_TOKEN + "module_env = { A = 1 }\n")


def test_invalid_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[token\nmodule = ")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in info.value.message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[token]\nmodule = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read configuration file") as info:
        load_config(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize(
    "text, expected",
    [
        ('credential = "ops"\n', "[[credential]] tables"),
        ("credential = [1, 2]\n", "must be a table"),
        ('[credential]\nname = "a"\nkey = "k"\n', "[[credential]] tables"),
    ],
)
def test_credential_not_list_of_tables(text: str, expected: str) -> None:
    toml = text + MINIMAL_TOKEN if not text.startswith("[") else MINIMAL_TOKEN + text
    assert expected in config_error(toml)


def test_error_message_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL_TOKEN + "bogus = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message and "bogus" in info.value.message


# --------------------------------------------------------------------------------------------------------------
# find_config precedence
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def isolated_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_CONFIG_HOME pointing at an empty folder, DFNS_AGENT_CONFIG unset."""
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    return xdg


def test_find_config_explicit_wins(isolated_config_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write_config(isolated_config_env / "dfns-agent", MINIMAL_TOKEN)
    env_file = write_config(tmp_path / "env", MINIMAL_TOKEN)
    explicit = write_config(tmp_path / "explicit", MINIMAL_TOKEN)
    monkeypatch.setenv(CONFIG_ENV, str(env_file))
    assert find_config(explicit) == explicit
    assert find_config(str(explicit)) == explicit
    assert default.exists()


def test_find_config_env_beats_default(
    isolated_config_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(isolated_config_env / "dfns-agent", MINIMAL_TOKEN)
    env_file = write_config(tmp_path / "env", MINIMAL_TOKEN)
    monkeypatch.setenv(CONFIG_ENV, str(env_file))
    assert find_config() == env_file
    assert find_config(None) == env_file
    assert load_config().path == env_file


def test_find_config_default_xdg(isolated_config_env: Path) -> None:
    default = write_config(isolated_config_env / "dfns-agent", MINIMAL_TOKEN)
    assert find_config() == default
    assert load_config().token.label == "dfns-token"


def test_find_config_none_exists(isolated_config_env: Path) -> None:
    if Path("/etc/dfns-agent/agent.toml").exists():  # pragma: no cover - depends on the machine
        pytest.skip("a system-wide config exists on this machine")
    with pytest.raises(ConfigError) as info:
        find_config()
    msg = info.value.message
    assert "no configuration file" in msg
    assert "--config" in msg and CONFIG_ENV in msg
    assert str(isolated_config_env / "dfns-agent" / "agent.toml") in msg
    assert "/etc/dfns-agent/agent.toml" in msg


# --------------------------------------------------------------------------------------------------------------
# read_pin / read_pin_file
# --------------------------------------------------------------------------------------------------------------


def write_pin(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def must_not_prompt(message: str) -> str:
    raise AssertionError(f"prompt called: {message}")


def test_pin_file_wins_over_all_other_sources(tmp_path: Path) -> None:
    pin_file = write_pin(tmp_path / "pin", "from-file\n")
    creds = tmp_path / "creds"
    write_pin(creds / "pin", "from-systemd")
    environ = {"CREDENTIALS_DIRECTORY": str(creds), "PIN_VAR": "from-env"}
    cfg = SecretSource(file=pin_file, env="PIN_VAR", prompt=True)
    pin = read_secret(cfg, environ=environ, prompt=must_not_prompt, interactive=True)
    assert pin.reveal() == "from-file"
    assert pin.source == f"file {pin_file}"


def test_configured_but_missing_pin_file_is_an_error_not_a_fallthrough(tmp_path: Path) -> None:
    cfg = SecretSource(file=tmp_path / "missing", env="PIN_VAR")
    with pytest.raises(SecretError, match="cannot open PIN file"):
        read_secret(cfg, environ={"PIN_VAR": "1234"}, prompt=must_not_prompt, interactive=True)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o601, 0o610])
def test_pin_file_with_group_or_other_access_refused(tmp_path: Path, mode: int) -> None:
    pin_file = write_pin(tmp_path / "pin", "1234", mode)
    with pytest.raises(SecretError) as info:
        read_secret(SecretSource(file=pin_file), environ={}, interactive=False)
    msg = info.value.message
    assert "chmod 600" in msg
    assert f"{mode:04o}" in msg
    assert "1234" not in msg
    assert info.value.code == "secret_error"


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_pin_file_owner_only_accepted(tmp_path: Path, mode: int) -> None:
    pin_file = write_pin(tmp_path / "pin", "1234", mode)
    assert read_secret_file(pin_file) == "1234"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root (CI runs as root)")
def test_a_pin_file_another_user_owns_is_refused(tmp_path: Path) -> None:
    # Its owner could read the PIN, or put a wrong one there that locks the token.
    pin_file = write_pin(tmp_path / "pin", "1234")
    os.chown(pin_file, 65534, 65534)
    with pytest.raises(SecretError, match="belongs to uid 65534; it must belong to the agent's user") as info:
        read_secret_file(pin_file)
    assert "1234" not in info.value.message
    os.chown(pin_file, 0, 0)
    assert read_secret_file(pin_file) == "1234"


@pytest.mark.parametrize("source", ["env", "prompt"])
def test_a_pin_that_is_not_utf8_is_a_secret_error_that_shows_none_of_it(source: str) -> None:
    raw = os.fsdecode(b"secret\xff123")  # as Python keeps such bytes from the environment or a terminal
    cfg = SecretSource(env="PIN_VAR" if source == "env" else None, prompt=source == "prompt")
    with pytest.raises(SecretError, match="is not UTF-8 text") as info:
        read_secret(cfg, environ={"PIN_VAR": raw}, prompt=lambda _: raw, interactive=True)
    assert "secret" not in info.value.message and "123" not in info.value.message


@pytest.mark.parametrize(
    "content, expected",
    [("1234\n", "1234"), ("1234", "1234"), ("1234\n\n", "1234\n"), (" 12 34 \n", " 12 34 ")],
)
def test_pin_file_single_trailing_newline_stripped(tmp_path: Path, content: str, expected: str) -> None:
    pin_file = write_pin(tmp_path / "pin", content)
    assert read_secret(SecretSource(file=pin_file), environ={}, interactive=False).reveal() == expected


@pytest.mark.parametrize("content", ["", "\n"])
def test_empty_pin_file_refused(tmp_path: Path, content: str) -> None:
    pin_file = write_pin(tmp_path / "pin", content)
    with pytest.raises(SecretError, match="is empty"):
        read_secret(SecretSource(file=pin_file), environ={}, interactive=False)


def test_pin_file_symlink_refused(tmp_path: Path) -> None:
    target = write_pin(tmp_path / "real-pin", "1234")
    link = tmp_path / "pin"
    link.symlink_to(target)
    with pytest.raises(SecretError, match="cannot open PIN file") as info:
        read_secret(SecretSource(file=link), environ={}, interactive=False)
    assert "1234" not in info.value.message
    assert read_secret_file(target) == "1234"  # the target itself is fine


def test_pin_file_directory_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pindir"
    folder.mkdir(mode=0o700)
    with pytest.raises(SecretError, match="not a regular file"):
        read_secret_file(folder)


def test_pin_file_not_utf8_refused(tmp_path: Path) -> None:
    pin_file = write_pin(tmp_path / "pin", b"\xff\xfe")
    with pytest.raises(SecretError, match="not UTF-8"):
        read_secret_file(pin_file)


def test_systemd_credential_used(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    write_pin(creds / "hsm-pin", "from-systemd\n", 0o440)
    cfg = SecretSource(credential="hsm-pin", env="PIN_VAR")
    pin = read_secret(
        cfg,
        environ={"CREDENTIALS_DIRECTORY": str(creds), "PIN_VAR": "from-env"},
        prompt=must_not_prompt,
        interactive=True,
    )
    assert pin.reveal() == "from-systemd"
    assert pin.source == "systemd credential hsm-pin"


def test_systemd_directory_without_the_credential_falls_through(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    write_pin(creds / "other", "x")
    pin = read_secret(
        SecretSource(env="PIN_VAR"),
        environ={"CREDENTIALS_DIRECTORY": str(creds), "PIN_VAR": "from-env"},
        interactive=False,
    )
    assert pin.reveal() == "from-env"


def test_empty_systemd_credential_refused(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    write_pin(creds / "pin", "")
    with pytest.raises(SecretError, match="empty"):
        read_secret(SecretSource(), environ={"CREDENTIALS_DIRECTORY": str(creds)}, interactive=False)


def test_env_var_named_by_config() -> None:
    cfg = SecretSource(env="MY_HSM_PIN")
    pin = read_secret(cfg, environ={"MY_HSM_PIN": "98765", "PIN": "wrong"}, prompt=must_not_prompt, interactive=True)
    assert pin.reveal() == "98765"
    assert pin.source == "environment variable MY_HSM_PIN"


def test_env_var_not_consulted_when_not_configured() -> None:
    with pytest.raises(SecretError):
        read_secret(SecretSource(env=None), environ={"PIN": "1234", "DFNS_AGENT_PIN": "1234"}, interactive=False)


def test_prompt_used_when_interactive() -> None:
    asked: list[str] = []

    def prompt(message: str) -> str:
        asked.append(message)
        return "typed-pin"

    pin = read_secret(SecretSource(env="UNSET"), environ={}, prompt=prompt, interactive=True)
    assert pin.reveal() == "typed-pin"
    assert pin.source == "prompt"
    assert asked == ["PIN: "]


def test_read_pin_prompts_with_the_token_name() -> None:
    asked: list[str] = []
    cfg = TokenConfig(module="/m.so", label="vault-hsm", pin=SecretSource(credential=None))
    pin = read_pin(cfg, environ={}, prompt=lambda m: asked.append(m) or "p", interactive=True)
    assert pin.reveal() == "p" and asked == ["PIN for token 'vault-hsm': "]


def test_prompt_not_used_when_not_interactive() -> None:
    with pytest.raises(SecretError, match="no PIN available"):
        read_secret(SecretSource(), environ={}, prompt=must_not_prompt, interactive=False)


def test_prompt_not_used_when_disabled() -> None:
    with pytest.raises(SecretError, match=r"prompt \(disabled\)"):
        read_secret(SecretSource(prompt=False), environ={}, prompt=must_not_prompt, interactive=True)


def test_empty_prompt_answer_refused() -> None:
    with pytest.raises(SecretError, match="no PIN entered"):
        read_secret(SecretSource(), environ={}, prompt=lambda _m: "", interactive=True)


def test_nothing_available_lists_what_was_tried(tmp_path: Path) -> None:
    cfg = SecretSource(credential="hsm-pin", env="MY_HSM_PIN")
    with pytest.raises(SecretError) as info:
        read_secret(cfg, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}, interactive=False)
    msg = info.value.message
    assert msg.startswith("no PIN available; tried ")
    assert "pin.file" in msg
    assert "systemd credential 'hsm-pin'" in msg
    assert "environment variable 'MY_HSM_PIN'" in msg
    assert "prompt (no terminal)" in msg


def test_nothing_available_without_env_configured() -> None:
    with pytest.raises(SecretError) as info:
        read_secret(SecretSource(prompt=False), environ={}, interactive=False)
    assert "pin.env (not set)" in info.value.message
    assert "prompt (disabled)" in info.value.message


@pytest.mark.parametrize("source", ["file", "systemd", "env", "prompt"])
def test_cloudhsm_style_pin_passes_through(tmp_path: Path, source: str) -> None:
    value = "user:pa:ss"
    environ: dict[str, str] = {}
    cfg = SecretSource()
    if source == "file":
        cfg = SecretSource(file=write_pin(tmp_path / "pin", value + "\n"))
    elif source == "systemd":
        write_pin(tmp_path / "creds" / "pin", value)
        environ["CREDENTIALS_DIRECTORY"] = str(tmp_path / "creds")
    elif source == "env":
        cfg = SecretSource(env="CLOUDHSM_PIN")
        environ["CLOUDHSM_PIN"] = value
    pin = read_secret(cfg, environ=environ, prompt=lambda _m: value, interactive=source == "prompt")
    assert pin.reveal() == "user:pa:ss"


def test_pin_repr_and_str_hide_value(tmp_path: Path) -> None:
    secret = "s3cr3t-PIN-value"
    pin = read_secret(SecretSource(file=write_pin(tmp_path / "pin", secret)), environ={}, interactive=False)
    assert pin.reveal() == secret
    for text in (repr(pin), str(pin), f"{pin}", f"{pin!r}", repr([pin]), repr({"pin": pin})):
        assert secret not in text
        assert "hidden" in text


def test_pin_object_has_no_dict_leaking_value() -> None:
    pin = Secret("1234", "prompt")
    assert not hasattr(pin, "__dict__")
    assert "1234" not in repr(pin) and "1234" not in str(pin)
    assert pin.source == "prompt"


def test_example_config_is_valid_and_documents_every_setting() -> None:
    """pkcs11_config/agent.example.toml must load, and mention every setting the parser knows."""
    import inspect

    from agent import config as config_module

    example = ROOT / "pkcs11_config" / "agent.example.toml"
    cfg = load_config(example)
    # As it is, the file needs no Dfns token (the README's systemd steps take it as it is) ...
    assert cfg.credentials[0].dfns is None
    text = example.read_text()
    # ... and its [credential.dfns] table, uncommented, is valid.
    table = r"^# (\[credential\.dfns\]|base_url =|token_credential =|timeout =|connect_timeout =|retries =)"
    uncommented = re.sub(table, r"\1", text, flags=re.M)
    assert uncommented != text
    dfns = config_from_text(uncommented.encode(), example).credentials[0].dfns
    assert dfns is not None and dfns.token.credential == "dfns-token"
    source = inspect.getsource(config_module)
    sets = re.findall(r"_only\(\s*\w+,\s*(\{[^}]*\})", source)
    keys = {key for allowed in sets for key in re.findall(r'"(\w+)"', allowed)}
    # Settings spliced in from a module constant ({..., *_TOKEN_LIMITS}) are settings too.
    spliced = {name for allowed in sets for name in re.findall(r"\*(\w+)", allowed)}
    keys |= {key for name in spliced for key in getattr(config_module, name)}
    assert {"sign_timeout", "max_sessions"} <= keys  # the splices were read
    for key in sorted(keys):
        assert re.search(rf"^#? ?{key}\b|^\[{key}\]|^\[\[{key}\]\]|\[\w+\.{key}\]", text, re.M), key
