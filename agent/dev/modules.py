"""Tokens on PKCS#11 modules other than plain SoftHSM, for the module contract suite (``tests/modules/``).

Each :class:`Backend` makes one token with keys on it and says how an agent reaches it (module path and
``[token.module_env]``). Backends with a process of their own (``p11-kit server``, ``swtpm``) can be
killed and restarted, or stopped (SIGSTOP) and continued, to drill a vanished or hung HSM:

- ``softhsm``: SoftHSM in the agent's process (the reference);
- ``p11kit``: ``p11-kit-client.so`` → ``p11-kit server`` → SoftHSM, the usual stand-in for a network HSM;
- ``opencryptoki``: opencryptoki's soft token (RSA only: the 3.8 soft token has no EC mechanisms), with
  ``pkcsslotd`` running;
- ``tpm2``: tpm2-pkcs11 on a software TPM (``swtpm``, reached through its socket TCTI).

:func:`unavailable` names what is missing when a backend's packages are not installed; the suite skips
only then, with that reason.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.dev import softhsm


def _multiarch() -> str:
    """This machine's Debian multiarch triplet (``x86_64-linux-gnu``, ``aarch64-linux-gnu``, ...)."""
    return str(sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu")


def pkcs11_module(name: str) -> str:
    """Where Debian and Ubuntu install PKCS#11 module ``name``: ``/usr/lib/<multiarch>/pkcs11/``."""
    return f"/usr/lib/{_multiarch()}/pkcs11/{name}"


P11KIT_CLIENT = pkcs11_module("p11-kit-client.so")
OPENCRYPTOKI = pkcs11_module("libopencryptoki.so")
TPM2_PKCS11 = pkcs11_module("libtpm2_pkcs11.so")
PIN = "module-pin-1234"
SO_PIN = "module-so-5678"
LABEL = "contract"


class BackendError(RuntimeError):
    """A backend could not be set up (a tool failed); the message has the tool's output."""


def _run(*cmd: str, env: Mapping[str, str] | None = None, input: str | None = None) -> str:
    r = subprocess.run(list(cmd), env=dict(env or os.environ), input=input, capture_output=True, text=True)
    if r.returncode != 0:
        raise BackendError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise BackendError(f"{what} exited with {proc.returncode} before {path} appeared")
        time.sleep(0.02)
    raise BackendError(f"{what}: {path} did not appear within {timeout}s")


@dataclass
class Backend:
    """One token on one module: what an agent's ``[token]`` needs, and the backend process if any."""

    name: str
    directory: Path
    module: str
    keys: dict[str, str]  # key label -> key kind
    module_env: dict[str, str] = field(default_factory=dict)
    token_extra: str = ""  # more [token] settings this module needs (documented in the README's table)
    process: subprocess.Popen[bytes] | None = None
    pin: str = PIN
    serves_calls: bool = False  # the backend process answers the token calls (so killing or stopping it bites)

    @property
    def label(self) -> str:
        return LABEL

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.module_env}

    def token_section(self, pin_file: Path) -> str:
        env = "".join(f'{k} = "{v}"\n' for k, v in self.module_env.items())
        return (
            f'[token]\nmodule = "{self.module}"\nlabel = "{self.label}"\n{self.token_extra}'
            f'[token.module_env]\n{env}[token.pin]\nfile = "{pin_file}"\n'
        )

    # -- the backend process (none for modules that live in the agent's process) -----------------------

    @property
    def has_process(self) -> bool:
        return self.process is not None

    def start(self) -> None:
        """Start (or restart) the backend process; nothing for in-process modules."""

    # Backends run in a process group of their own (``p11-kit server`` forks a child per connection):
    # signals go to the whole group.
    def _signal_group(self, sig: int) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            self.process.wait(10)

    def pause(self) -> None:
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None:
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()


# ------------------------------------------------------------------------------------------------------
# SoftHSM, directly and behind p11-kit


SOFTHSM_KEYS = {"key-p256": "p256", "key-ed25519": "ed25519", "key-rsa2048": "rsa2048"}
# p11-kit 0.24's RPC cannot carry CKM_EDDSA (it drops it from the mechanism list): no Ed25519 through it.
P11KIT_KEYS = {"key-p256": "p256", "key-rsa2048": "rsa2048"}
UNSIGNABLE_ED25519 = "key-ed25519-not-through-p11kit"  # on the token, listed, but p11-kit cannot sign with it


def _softhsm_token(directory: Path, keys: Mapping[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    softhsm.create_token(directory, label=LABEL, pin=PIN, so_pin=SO_PIN)
    softhsm.generate_keys(directory, module=softhsm.require_module(), label=LABEL, pin=PIN, keys=keys)


def softhsm_backend(directory: Path) -> Backend:
    _softhsm_token(directory, SOFTHSM_KEYS)
    return Backend(
        "softhsm",
        directory,
        softhsm.require_module(),
        dict(SOFTHSM_KEYS),
        {"SOFTHSM2_CONF": str(directory / "softhsm2.conf")},
    )


class P11KitBackend(Backend):
    """``p11-kit server`` exporting a SoftHSM token on a Unix socket; the agent loads p11-kit's client."""

    @property
    def socket(self) -> Path:
        return self.directory / "p11kit.sock"

    def start(self) -> None:
        self.kill()
        self.socket.unlink(missing_ok=True)
        env = {**os.environ, "SOFTHSM2_CONF": str(self.directory / "softhsm2.conf")}
        self.process = subprocess.Popen(
            [
                "p11-kit",
                "server",
                "-f",
                "-n",
                str(self.socket),
                "--provider",
                softhsm.require_module(),
                f"pkcs11:token={LABEL}",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "p11kit.log", "ab"),  # noqa: SIM115 - the child holds it
            start_new_session=True,
        )
        _wait_for(self.socket, self.process, "p11-kit server")


def p11kit_backend(directory: Path) -> Backend:
    _softhsm_token(directory, {**P11KIT_KEYS, UNSIGNABLE_ED25519: "ed25519"})
    b = P11KitBackend("p11kit", directory, P11KIT_CLIENT, dict(P11KIT_KEYS), serves_calls=True)
    b.module_env = {"P11_KIT_SERVER_ADDRESS": f"unix:path={b.socket}"}
    b.start()
    return b


# ------------------------------------------------------------------------------------------------------
# opencryptoki's soft token


OCK_SLOT = "3"  # libpkcs11_sw.so in Debian's /etc/opencryptoki/opencryptoki.conf
OCK_STORE = Path("/var/lib/opencryptoki/swtok")
OCK_DEFAULT_SO_PIN = "87654321"
OCK_PIN = "33334444"  # the soft token takes 4 to 8 characters
OCK_KEYS = {"key-rsa2048": "rsa2048"}  # the 3.8 soft token has no EC mechanisms at all


class OpencryptokiBackend(Backend):
    """``pkcsslotd`` in the foreground (it keeps the slots' shared state; the soft token itself runs in the
    agent's process). opencryptoki has one store per machine: this backend wipes and re-initialises it."""

    def start(self) -> None:
        self.kill()
        if _running_slotd():
            return  # the machine's own pkcsslotd (a service): use it, leave it alone
        self.process = subprocess.Popen(
            ["pkcsslotd", "-f"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "pkcsslotd.log", "ab"),  # noqa: SIM115 - the child holds it
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while subprocess.run(["pkcsconf", "-s", "-c", OCK_SLOT], capture_output=True).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BackendError(f"pkcsslotd did not come up: {(self.directory / 'pkcsslotd.log').read_text()}")
            time.sleep(0.05)


def _running_slotd() -> bool:
    try:
        pid = int(Path("/run/pkcsslotd.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _pkcsconf(*args: str, answers: list[str]) -> None:
    _run("pkcsconf", *args, "-c", OCK_SLOT, input="".join(a + "\n" for a in answers))


def opencryptoki_backend(directory: Path) -> Backend:
    directory.mkdir(parents=True, exist_ok=True)
    for old in [*OCK_STORE.glob("*"), *(OCK_STORE / "TOK_OBJ").glob("*")]:
        if old.is_file():
            old.unlink()
    b = OpencryptokiBackend("opencryptoki", directory, OPENCRYPTOKI, dict(OCK_KEYS), pin=OCK_PIN)
    try:
        b.start()
        _pkcsconf("-I", answers=[OCK_DEFAULT_SO_PIN, LABEL])
        _pkcsconf("-u", answers=[OCK_DEFAULT_SO_PIN, "11112222", "11112222"])
        _pkcsconf("-p", answers=["11112222", OCK_PIN, OCK_PIN])  # a user PIN set by the SO must be changed once
        softhsm.generate_keys(directory, module=OPENCRYPTOKI, label=LABEL, pin=OCK_PIN, keys=OCK_KEYS)
    except BaseException:
        b.close()  # no backend process outlives a failed set-up
        raise
    return b


# ------------------------------------------------------------------------------------------------------
# tpm2-pkcs11 on swtpm


TPM_PIN = "tpm-user-1234"
TPM_KEYS = {"key-p256": "p256", "key-rsa2048": "rsa2048"}
# tpm2_ptool's keys also allow decryption (and tpm2-pkcs11 refuses a sign-only template): the agent must
# be told to accept that (README "PKCS#11 modules").
TPM_TOKEN_EXTRA = 'allow_other_usages = true\nkeygen_template = "module"\n'


def _free_ports() -> int:
    """A free TCP port whose next one is free too (the swtpm TCTI finds the control port at port + 1)."""
    while True:
        with socket.socket() as s, socket.socket() as ctrl:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            try:
                ctrl.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


class Tpm2Backend(Backend):
    """A software TPM (``swtpm``, TCP) behind the access broker ``tpm2-abrmd`` on a private D-Bus session
    bus: the TPM itself keeps one context per connection and runs out of object slots without a resource
    manager. The three processes share one process group; ``pause`` stops only the TPM, ``kill`` kills the
    TPM and the broker but leaves the bus up, as a machine's system bus stays up (GLib in the agent keeps
    one bus connection per process and cannot replace it once the bus is gone)."""

    swtpm: subprocess.Popen[bytes] | None = None
    abrmd: subprocess.Popen[bytes] | None = None

    @property
    def bus(self) -> str:
        return f"unix:path={self.directory / 'bus'}"

    def tools_env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SESSION_BUS_ADDRESS": self.bus, "TPM2TOOLS_TCTI": "tabrmd:bus_type=session"}

    def kill(self) -> None:
        for proc in (self.abrmd, self.swtpm):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)

    def start(self) -> None:
        self.kill()
        (self.directory / "tpm").mkdir(exist_ok=True)
        log = open(self.directory / "tpm2.log", "ab")  # noqa: SIM115 - the children hold it
        if self.process is None or self.process.poll() is not None:
            (self.directory / "bus").unlink(missing_ok=True)
            self.process = subprocess.Popen(
                ["dbus-daemon", "--session", "--nofork", f"--address={self.bus}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                process_group=0,  # a group of its own in this session, which the other two join
            )
            _wait_for(self.directory / "bus", self.process, "dbus-daemon")
        group = self.process.pid
        port = _free_ports()
        self.swtpm = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.directory / 'tpm'}",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            process_group=group,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.swtpm.poll() is not None or time.monotonic() > deadline:
                    raise BackendError(f"swtpm did not come up: {(self.directory / 'tpm2.log').read_text()}") from None
                time.sleep(0.05)
        abrmd = self.abrmd = subprocess.Popen(
            ["tpm2-abrmd", "--session", "--allow-root", "--flush-all", f"--tcti=swtpm:port={port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            process_group=group,
            env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": self.bus},
        )
        while subprocess.run(["tpm2_getrandom", "4"], env=self.tools_env(), capture_output=True).returncode != 0:
            if abrmd.poll() is not None or time.monotonic() > deadline:
                raise BackendError(f"tpm2-abrmd did not come up: {(self.directory / 'tpm2.log').read_text()}")
            time.sleep(0.1)

    def pause(self) -> None:
        assert self.swtpm is not None
        self.swtpm.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.swtpm is not None
        self.swtpm.send_signal(signal.SIGCONT)


def tpm2_backend(directory: Path) -> Backend:
    directory.mkdir(parents=True, exist_ok=True)
    store = directory / "store"
    store.mkdir()
    b = Tpm2Backend(
        "tpm2", directory, TPM2_PKCS11, dict(TPM_KEYS), pin=TPM_PIN, serves_calls=True, token_extra=TPM_TOKEN_EXTRA
    )
    b.module_env = {
        "TPM2_PKCS11_TCTI": "tabrmd:bus_type=session",
        "DBUS_SESSION_BUS_ADDRESS": b.bus,
        "TPM2_PKCS11_STORE": str(store),
        "TPM2_PKCS11_LOG_LEVEL": "0",
    }
    try:
        b.start()
        env = b.tools_env()
        where = f"--path={store}"
        _run("tpm2_ptool", "init", where, env=env)
        _run(
            "tpm2_ptool",
            "addtoken",
            "--pid=1",
            f"--sopin={SO_PIN}",
            f"--userpin={TPM_PIN}",
            f"--label={LABEL}",
            where,
            env=env,
        )
        algorithms = {"p256": "ecc256", "rsa2048": "rsa2048"}
        for label, kind in TPM_KEYS.items():
            _run(
                "tpm2_ptool",
                "addkey",
                f"--algorithm={algorithms[kind]}",
                f"--label={LABEL}",
                f"--key-label={label}",
                f"--userpin={TPM_PIN}",
                where,
                env=env,
            )
    except BaseException:
        b.close()  # no backend process outlives a failed set-up
        raise
    return b


# ------------------------------------------------------------------------------------------------------
# What is installed


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None when it can."""
    need: dict[str, tuple[list[str], list[str]]] = {
        "softhsm": (["softhsm2-util"], []),
        "p11kit": (["p11-kit", "softhsm2-util"], [P11KIT_CLIENT]),
        "opencryptoki": (["pkcsslotd", "pkcsconf"], [OPENCRYPTOKI]),
        # the tabrmd TCTI (libtss2-tcti-tabrmd0) is how tpm2-pkcs11 and the tools reach the broker
        "tpm2": (
            ["swtpm", "tpm2_ptool", "tpm2-abrmd", "dbus-daemon", "tpm2_getrandom"],
            [TPM2_PKCS11, f"/usr/lib/{_multiarch()}/libtss2-tcti-tabrmd.so.0"],
        ),
    }
    tools, files = need[name]
    missing = [t for t in tools if shutil.which(t) is None] + [f for f in files if not os.path.exists(f)]
    if name == "softhsm" or name == "p11kit":
        if softhsm.find_softhsm_module() is None:
            missing.append("libsofthsm2.so")
    return f"{name}: not installed ({', '.join(missing)} missing)" if missing else None
