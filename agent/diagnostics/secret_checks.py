"""The secrets' sources: the PIN file and each Dfns bearer token, read by the agent's own rules and dropped.

Neither value is ever part of a result; a fix is judged from the source itself (missing, not a regular
file, readable by others, someone else's), not from the error text.
"""

from __future__ import annotations

import os
import stat

from agent.config import CredentialConfig, SecretSource
from agent.diagnostics.results import Check, failed, passed
from agent.errors import SecretError
from agent.secret import Secret, read_secret, read_secret_file

PIN_KEYS = ("[token.pin] file", "[token.pin] env")
DFNS_KEYS = ("[credential.dfns] token_file", "[credential.dfns] token_env")


def secret_fix(source: SecretSource, what: str, keys: tuple[str, str], *, prompt: bool) -> str:
    """A fix for an unusable secret source; ``keys``: the file and env settings that name it."""
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


def check_pin_source(source: SecretSource) -> Check | None:
    """The PIN file's safety when the PIN check did not get to read it (e.g. the module was missing)."""
    if source.file is None:
        return None
    try:
        read_secret_file(source.file, "PIN")  # the same rules the agent applies; the value is dropped
    except SecretError as e:
        return failed("pin file", e.message, secret_fix(source, "PIN", PIN_KEYS, prompt=False))
    return passed("pin file", f"{source.file}, owner-only")


def read_dfns_token(cred: CredentialConfig) -> tuple[Check, Secret | None]:
    """Whether the bearer token's source is there and safe, and the token when it could be read (for the
    doctor's authenticated Dfns call; it never goes into a result, and is never shown)."""
    assert cred.dfns is not None
    name = f"dfns token {cred.name}"
    try:
        secret = read_secret(cred.dfns.token, what=f"Dfns token for credential {cred.name!r}", setting="dfns.token_")
    except SecretError as e:
        return failed(name, e.message, secret_fix(cred.dfns.token, "Dfns token", DFNS_KEYS, prompt=False)), None
    return passed(name, f"from {secret.source}"), secret
