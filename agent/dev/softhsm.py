"""SoftHSM bootstrap: the one way this repository makes a SoftHSM token, for the tests, the benchmark and
``softhsm_setup.sh``.

Finding the module, writing a ``softhsm2.conf`` (from ``pkcs11_config/softhsm2.conf.in``) for a token
directory, initializing a token with ``softhsm2-util``, and making keys with the agent's own
``Token.generate``, in a child process, so the calling process never loads SoftHSM against another token
directory. The small CLI (``python -m agent.dev.softhsm``) is what ``softhsm_setup.sh`` calls::

    python -m agent.dev.softhsm module                 # print the module's path (exit 1 if none)
    python -m agent.dev.softhsm dev-token DIR          # the dev token, key and DIR/agent.toml (idempotent)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout (agent.dev is not in the wheel)
CONF_TEMPLATE = ROOT / "pkcs11_config" / "softhsm2.conf.in"

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)

DEV_TOKEN_LABEL = "dfns-dev"
DEV_KEY_LABEL = "dfns-dev-ed25519"


class SoftHsmError(RuntimeError):
    """SoftHSM is missing, or a token could not be made."""


def find_softhsm_module() -> str | None:
    """SoftHSM's module on this machine (``$SOFTHSM_MODULE``, else where Debian and Ubuntu install it),
    for the dev token, the tests and the benchmark."""
    env = os.environ.get("SOFTHSM_MODULE")
    if env:
        return env
    return next((c for c in SOFTHSM_MODULES if os.path.isfile(c)), None)


def require_module() -> str:
    module = find_softhsm_module()
    if module is None:
        raise SoftHsmError("SoftHSM is not installed (apt-get install softhsm2, or ./softhsm_setup.sh test)")
    return module


def write_softhsm_conf(directory: Path) -> Path:
    """``directory/softhsm2.conf``, for tokens in ``directory/tokens``; returns its path."""
    conf = directory / "softhsm2.conf"
    conf.write_text(CONF_TEMPLATE.read_text().replace("@TOKENDIR@", str(directory / "tokens")))
    return conf


def environ(directory: Path) -> dict[str, str]:
    """This process's environment with ``SOFTHSM2_CONF`` pointing at ``directory``'s config."""
    return {**os.environ, "SOFTHSM2_CONF": str(directory / "softhsm2.conf")}


def token_present(directory: Path, label: str) -> bool:
    """Whether ``directory``'s SoftHSM has an initialized token labelled ``label``."""
    r = subprocess.run(["softhsm2-util", "--show-slots"], env=environ(directory), capture_output=True, text=True)
    return re.search(rf"^\s*Label:\s+{re.escape(label)}\s*$", r.stdout, re.MULTILINE) is not None


def init_token(directory: Path, *, label: str, pin: str, so_pin: str) -> None:
    """Initialize a token labelled ``label`` in the first free slot of ``directory`` (config written, tokens
    directory made, when missing)."""
    (directory / "tokens").mkdir(parents=True, exist_ok=True)
    if not (directory / "softhsm2.conf").exists():
        write_softhsm_conf(directory)
    _init(directory, "--free", label=label, pin=pin, so_pin=so_pin)


# softhsm2-util looks the token up by label before C_InitToken and again after it, then logs in as SO to set
# the user PIN. A C_Login in another process (an agent that just lost its keys logs in again to recover)
# rewrites token.object meanwhile, and a lookup can then miss the token ("Could not find a slot/token") or the
# SO login fail ("Could not log in on the token", seen once in CI under load). Running it again is safe: the
# SO PIN is unchanged, and it wipes again.
_LOST_TO_ANOTHER_LOGIN = ("Could not find a slot/token", "Could not log in on the token")
_REINIT_PAUSES = (0.05, 0.2, 0.5, None)


def reinit_token(directory: Path, *, label: str, pin: str, so_pin: str) -> None:
    """Re-initialize the token labelled ``label`` in place, as an operator might by mistake: every object on it
    is wiped and the user PIN becomes ``pin`` (the fault tests' way of taking keys away under a running agent).
    Run again, after a pause, when softhsm2-util loses the token to a login elsewhere (see above)."""
    for pause in _REINIT_PAUSES:
        try:
            _init(directory, "--token", label, label=label, pin=pin, so_pin=so_pin)
            return
        except SoftHsmError as e:
            if pause is None or not any(m in str(e) for m in _LOST_TO_ANOTHER_LOGIN):
                raise
            time.sleep(pause)


def delete_token(directory: Path, label: str) -> None:
    """Delete the token labelled ``label`` and its objects (no PIN needed: its files are removed)."""
    r = subprocess.run(
        ["softhsm2-util", "--delete-token", "--token", label], env=environ(directory), capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SoftHsmError(f"softhsm2-util --delete-token failed: {r.stderr.strip()}")


def _init(directory: Path, *where: str, label: str, pin: str, so_pin: str) -> None:
    try:
        subprocess.run(
            ["softhsm2-util", "--init-token", *where, "--label", label, "--pin", pin, "--so-pin", so_pin],
            check=True,
            env=environ(directory),
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise SoftHsmError("softhsm2-util not found (apt-get install softhsm2)") from None
    except subprocess.CalledProcessError as e:
        raise SoftHsmError(f"softhsm2-util --init-token failed: {e.stderr.strip()}") from None


def create_token(directory: Path, *, label: str, pin: str, so_pin: str | None = None) -> Path:
    """A fresh token directory: ``directory/softhsm2.conf``, ``directory/tokens`` and a token ``label``;
    returns the config's path."""
    conf = write_softhsm_conf(directory)
    init_token(directory, label=label, pin=pin, so_pin=so_pin or secrets.token_hex(8))
    return conf


# Runs in a child (stdin: a JSON job); the agent's own key generation, so keys are made as the agent makes them.
_GENERATE = """
import json, sys
from agent.config import TokenConfig
from agent.secret import Secret
from agent.token.device import KeyKind, Token
job = json.load(sys.stdin)
cfg = TokenConfig(module=job["module"], label=job["label"])
with Token.open(cfg, Secret(job["pin"], "softhsm bootstrap"), rw=True) as t:
    have = {k.label for k in t.keys()}
    for label, kind in job["keys"].items():
        if not (job["keep_existing"] and label in have):
            t.generate(KeyKind(kind), label)
    print(json.dumps({k.label: k.public_pem for k in t.keys()}))
"""


def generate_keys(
    directory: Path,
    *,
    module: str,
    label: str,
    pin: str,
    keys: Mapping[str, str],
    keep_existing: bool = False,
) -> dict[str, str]:
    """Make ``keys`` (label -> key kind, e.g. ``{"key-p256": "p256"}``) on token ``label`` of ``directory``
    with ``Token.generate``, in a child process; returns the public key (PEM) of every key on the token, by
    label. With ``keep_existing`` a label already on the token is left as it is."""
    job = {"module": module, "label": label, "pin": pin, "keys": dict(keys), "keep_existing": keep_existing}
    out = subprocess.run(
        [sys.executable, "-c", _GENERATE],
        input=json.dumps(job),
        env=environ(directory),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SoftHsmError(f"key generation failed:\n{out.stderr.strip()}")
    public: dict[str, str] = json.loads(out.stdout)
    return public


def agent_config(
    *,
    module: str,
    label: str,
    softhsm_conf: Path,
    pin_file: Path,
    credentials: Sequence[tuple[str, str, str | None]],
    server: str | None = None,
) -> str:
    """A minimal agent.toml for a SoftHSM token: ``credentials`` are (name, key label, cred_id or None)."""
    text = (
        f'[token]\nmodule = "{module}"\nlabel = "{label}"\n'
        f'[token.module_env]\nSOFTHSM2_CONF = "{softhsm_conf}"\n'
        f'[token.pin]\nfile = "{pin_file}"\n'
    )
    if server is not None:
        text += f"[server]\n{server}"
    for name, key, cred_id in credentials:
        text += f'\n[[credential]]\nname = "{name}"\nkey = "{key}"\n'
        if cred_id is not None:
            text += f'cred_id = "{cred_id}"\n'
    return text


# ------------------------------------------------------------------------------------------------------
# The dev token of softhsm_setup.sh


def dev_config(dev: Path, module: str) -> str:
    return f"""\
# Written by softhsm_setup.sh for the SoftHSM dev token; see pkcs11_config/agent.example.toml.
[token]
module = "{module}"
label = "{DEV_TOKEN_LABEL}"

[token.module_env]
SOFTHSM2_CONF = "{dev}/softhsm2.conf"

[token.pin]
file = "{dev}/pin"

[[credential]]
name = "dev"
key = "{DEV_KEY_LABEL}"

# The local Dfns-compatible API of ./softhsm_setup.sh dev-dfns; point base_url at https://api.dfns.io
# and token_file at a service-account token for the real thing.
[credential.dfns]
base_url = "http://127.0.0.1:8400"
token_file = "{dev}/dfns/dev.token"
"""


def _secret_file(path: Path, make: str) -> str:
    """The content of ``path`` (first line), writing ``make`` there first when it is missing or empty."""
    if not path.exists() or path.stat().st_size == 0:
        path.write_text(make + "\n")
    path.chmod(0o600)
    return path.read_text().splitlines()[0]


def setup_dev_token(dev: Path, *, say: bool = True) -> Path:
    """``softhsm_setup.sh``'s dev token in ``dev`` (the checkout's ``.dev``), idempotently: the token
    directory and its config, a random PIN and SO PIN (0600), a dev service-account token for the local
    Dfns API, the token ``dfns-dev`` with the Ed25519 key ``dfns-dev-ed25519``, and ``dev/agent.toml``.
    Returns the agent config's path."""

    def note(message: str) -> None:
        if say:
            print(f"==> {message}", file=sys.stderr)

    module = require_module()
    (dev / "tokens").mkdir(parents=True, exist_ok=True)
    dev.chmod(0o700)
    write_softhsm_conf(dev)
    old = os.umask(0o077)  # from here on (the secrets, the token's files, agent.toml): owner only
    try:
        lost = [p.name for p in (dev / "pin", dev / "so-pin") if not p.exists() or p.stat().st_size == 0]
        pin = _secret_file(dev / "pin", secrets.token_hex(8))
        so_pin = _secret_file(dev / "so-pin", secrets.token_hex(8))
        (dev / "dfns").mkdir(exist_ok=True)
        _secret_file(dev / "dfns" / "dev.token", "dev-" + secrets.token_urlsafe(24))
        if lost and token_present(dev, DEV_TOKEN_LABEL):
            # Its PIN is gone with the file: nothing can log in to it any more, so it is made anew (a new key).
            note(f"{', '.join(lost)} gone: deleting dev token '{DEV_TOKEN_LABEL}' to make it anew, with a new key")
            delete_token(dev, DEV_TOKEN_LABEL)
        if not token_present(dev, DEV_TOKEN_LABEL):
            note(f"initializing SoftHSM token '{DEV_TOKEN_LABEL}' in {dev / 'tokens'}")
            init_token(dev, label=DEV_TOKEN_LABEL, pin=pin, so_pin=so_pin)
        config = dev / "agent.toml"
        config.write_text(dev_config(dev, module))
        if DEV_KEY_LABEL not in generate_keys(dev, module=module, label=DEV_TOKEN_LABEL, pin=pin, keys={}):
            note(f"generating Ed25519 key '{DEV_KEY_LABEL}' on the dev token")
            generate_keys(dev, module=module, label=DEV_TOKEN_LABEL, pin=pin, keys={DEV_KEY_LABEL: "ed25519"})
    finally:
        os.umask(old)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.dev.softhsm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("module", help="print the SoftHSM module's path (exit 1 if there is none)")
    dev = sub.add_parser("dev-token", help="the dev token, its key and DIR/agent.toml, idempotently")
    dev.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "module":
            print(require_module())
        else:
            print(setup_dev_token(args.dir.absolute()))
    except SoftHsmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
