"""Reading secrets (the token PIN, the Dfns bearer token) without a command line or a log ever seeing them.

Sources, in order of preference: a file that only its owner can read, a systemd credential
(``$CREDENTIALS_DIRECTORY/<name>``, from ``LoadCredential=``), an environment variable whose *name* is in
the config, and, for the PIN only, an interactive prompt without echo. The first configured source wins;
a source that is configured but unusable is an error rather than a silent fall-through, so an operator
who set a PIN file never ends up typing a PIN by accident. Values pass through unchanged: CloudHSM-style
``user:password`` PINs work as they are.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.config import SecretSource, TokenConfig
from agent.errors import SecretError


class Secret:
    """A secret value that will not show itself in a repr, a traceback or a log line."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<hidden>, source={self.source!r})"

    __str__ = __repr__


def _text(value: str, where: str) -> str:
    """``value`` if it is text the token can take as UTF-8 bytes; bytes that are not UTF-8 (which Python
    keeps as lone surrogates) would fail later in the token layer, in a traceback showing part of it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SecretError(f"{where} is not UTF-8 text") from None
    return value


def _strip_newline(value: str) -> str:
    # Files written by `echo` end in a newline; secrets never do. Other whitespace is kept: it may be real.
    return value[:-1] if value.endswith("\n") else value


def read_secret_file(path: Path, what: str = "PIN") -> str:
    """Read a secret file, refusing it if group or others have any access, or if anyone but this user or root
    owns it (as OpenSSH does for keys): its owner could read the secret, or replace it with a wrong PIN
    that locks the token."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SecretError(f"cannot open {what} file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{what} file {path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise SecretError(
                f"{what} file {path} belongs to uid {st.st_uid}; it must belong to the agent's user "
                f"(uid {os.geteuid()}) or root (chown {os.geteuid()} {path})"
            )
        if st.st_mode & 0o077:
            raise SecretError(
                f"{what} file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be accessible by group "
                f"or others (chmod 600 {path})"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(64 * 1024)
    finally:
        os.close(fd)
    try:
        value = _strip_newline(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SecretError(f"{what} file {path} is not UTF-8 text") from None
    if not value:
        raise SecretError(f"{what} file {path} is empty")
    return value


def read_secret(
    source: SecretSource,
    *,
    what: str = "PIN",
    setting: str = "pin.",
    environ: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
    interactive: bool | None = None,
    prompt_text: str | None = None,
) -> Secret:
    """Return the secret from the first configured source (see the module docstring for the order).

    ``what`` names the secret in messages ("PIN", "Dfns token"); ``setting`` is the config prefix of its
    source settings, so an error can say which setting to fill in.
    """
    env = os.environ if environ is None else environ
    if source.file is not None:
        return Secret(read_secret_file(source.file, what), f"file {source.file}")
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and source.credential:
        cred_path = Path(cred_dir) / source.credential
        if cred_path.exists():
            # systemd makes the credential readable by the service only (its mode varies by version),
            # so the strict file-mode check is not applied here.
            try:
                value = _strip_newline(cred_path.read_text("utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise SecretError(f"cannot read systemd credential {source.credential!r}: {e}") from None
            if not value:
                raise SecretError(f"systemd credential {source.credential!r} is empty")
            return Secret(value, f"systemd credential {source.credential}")
    if source.env:
        from_env = _from_environment(source.env, env, real=environ is None)
        if from_env:
            where = f"environment variable {source.env}"
            return Secret(_text(from_env, where), where)
    if interactive is None:
        interactive = sys.stdin.isatty()
    if source.prompt and interactive:
        ask = prompt or _prompt_no_echo
        value = ask(prompt_text or f"{what}: ")
        if not value:
            raise SecretError(f"no {what} entered")
        return Secret(_text(value, f"the {what} entered"), "prompt")
    tried = [f"{setting}file (not set)", f"systemd credential {source.credential!r} (not present)"]
    tried.append(f"environment variable {source.env!r} (not set)" if source.env else f"{setting}env (not set)")
    tried.append("prompt (no terminal)" if source.prompt else "prompt (disabled)")
    raise SecretError(f"no {what} available; tried " + ", ".join(tried))


# Secrets taken out of this process's environment, by variable name: a later read (a reload) finds them here.
_taken: dict[str, str] = {}


def _from_environment(name: str, env: Mapping[str, str], *, real: bool) -> str | None:
    """The variable's value; from the real environment it is taken out once read: ``os.environ`` and the C
    environment lose it (no child process inherits it), and the copy the kernel shows in
    ``/proc/PID/environ`` is overwritten where it can be (see :func:`_wipe_initial_environment`)."""
    value = env.get(name)
    if not real:
        return value
    if value:
        _taken[name] = value
        os.environ.pop(name, None)  # unsetenv() too
        _wipe_initial_environment(name)
        return value
    return _taken.get(name)


def _wipe_initial_environment(name: str) -> bool:
    """Overwrite ``NAME=value`` in the environment block the process started with, which is what
    ``/proc/PID/environ`` shows (unsetenv only drops glibc's pointer to it). Best effort: the block's
    bounds come from ``/proc/self/stat`` (fields 50 and 51) and it is written through ``/proc/self/mem``;
    where either is refused, the value stays visible there to root and to the agent's own uid."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # fields 50 and 51 (the list starts at field 3)
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            block = mem.read(end - start)
            entry = name.encode() + b"="
            at = 0 if block.startswith(entry) else block.find(b"\0" + entry) + 1
            if at <= 0 and not block.startswith(entry):
                return False
            stop = block.find(b"\0", at)
            stop = len(block) if stop < 0 else stop
            mem.seek(start + at)
            mem.write(b"\0" * (stop - at))
        return True
    except (OSError, ValueError, IndexError):
        return False


def read_pin(token: TokenConfig, **kwargs: Any) -> Secret:
    """The user PIN for ``token`` from its configured sources."""
    name = repr(token.label) if token.label else f"serial {token.serial}"
    return read_secret(token.pin, what="PIN", setting="pin.", prompt_text=f"PIN for token {name}: ", **kwargs)


def _prompt_no_echo(message: str) -> str:
    import getpass

    return getpass.getpass(message)
