"""Reading the token PIN without ever putting it on a command line or in a log.

Sources, in order of preference: a file that only its owner can read, a systemd credential
(``$CREDENTIALS_DIRECTORY/<name>``, from ``LoadCredential=``), an environment variable whose *name* is in
the config, and last an interactive prompt without echo. The first configured source wins; a source that
is configured but unusable is an error rather than a silent fall-through, so an operator who set a PIN
file never ends up typing a PIN by accident. The value passes through unchanged: CloudHSM-style
``user:password`` PINs work as they are.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from agent.config import PinConfig
from agent.errors import PinError


class Pin:
    """A PIN value that will not show itself in a repr, a traceback or a log line."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Pin(<hidden>, source={self.source!r})"

    __str__ = __repr__


def _strip_newline(value: str) -> str:
    # Files written by `echo` end in a newline; PINs never do. Other whitespace is kept: it may be real.
    return value[:-1] if value.endswith("\n") else value


def read_pin_file(path: Path) -> str:
    """Read a PIN file, refusing it if group or others have any access (as OpenSSH does for keys)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise PinError(f"cannot open PIN file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PinError(f"PIN file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise PinError(
                f"PIN file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be accessible by group "
                f"or others (chmod 600 {path})"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(4096)
    finally:
        os.close(fd)
    try:
        value = _strip_newline(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise PinError(f"PIN file {path} is not UTF-8 text") from None
    if not value:
        raise PinError(f"PIN file {path} is empty")
    return value


def read_pin(
    cfg: PinConfig,
    *,
    environ: dict[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
    interactive: bool | None = None,
    token_name: str = "token",
) -> Pin:
    """Return the PIN from the first configured source (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    if cfg.file is not None:
        return Pin(read_pin_file(cfg.file), f"file {cfg.file}")
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        cred_path = Path(cred_dir) / cfg.credential
        if cred_path.exists():
            # systemd makes the credential readable by the service only; its mode is 0400 or 0440-ish
            # depending on version, so the strict file-mode check is not applied here.
            try:
                value = _strip_newline(cred_path.read_text("utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise PinError(f"cannot read systemd credential {cfg.credential!r}: {e}") from None
            if not value:
                raise PinError(f"systemd credential {cfg.credential!r} is empty")
            return Pin(value, f"systemd credential {cfg.credential}")
    if cfg.env:
        from_env = env.get(cfg.env)
        if from_env:
            return Pin(from_env, f"environment variable {cfg.env}")
    if interactive is None:
        interactive = sys.stdin.isatty()
    if cfg.prompt and interactive:
        ask = prompt or _prompt_no_echo
        value = ask(f"PIN for {token_name}: ")
        if not value:
            raise PinError("no PIN entered")
        return Pin(value, "prompt")
    tried = ["pin.file (not set)", f"systemd credential {cfg.credential!r} (not present)"]
    tried.append(f"environment variable {cfg.env!r} (not set)" if cfg.env else "pin.env (not set)")
    tried.append("prompt (no terminal)" if cfg.prompt else "prompt (disabled)")
    raise PinError("no PIN available; tried " + ", ".join(tried))


def _prompt_no_echo(message: str) -> str:
    import getpass

    return getpass.getpass(message)
