"""Commands for running the agent as a service: ``reload`` (the units' ``ExecReload=``) and ``files``, which
prints or installs the example config and the systemd units shipped inside the package, so a
``pip install dfns-agent`` has them without a checkout."""

from __future__ import annotations

import errno
import math
import os
import signal
import tempfile
import time
from importlib import resources
from pathlib import Path

import click

from agent.cli.util import CliError

_DATA = "agent.data"
# name shown and accepted -> file inside the package (pkcs11_config/ in a checkout is their source)
FILES = {
    "agent.example.toml": "agent.example.toml",
    "dfns-agent.service": "systemd/dfns-agent.service",
    "dfns-agent.socket": "systemd/dfns-agent.socket",
    "user/dfns-agent.service": "systemd/user/dfns-agent.service",
    "user/dfns-agent.socket": "systemd/user/dfns-agent.socket",
}


@click.command("reload")
# min=1: kill(2) reads 0 as this command's own process group and -1 as every process it may signal, so a
# SIGHUP there would hang up the caller's shell or (as root) the whole system instead of reloading an agent.
@click.option(
    "--pid",
    type=click.IntRange(min=1),
    required=True,
    help="The agent's main process (in a unit: $MAINPID).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=90.0,
    show_default=True,
    help="Seconds to wait for the outcome.",
)
def reload(pid: int, timeout: float) -> None:
    """Reload a running agent; wait for every worker.

    Exit 0 once every worker has applied the new config, 1 if it was refused (with why; the running config
    stays). What the units' ExecReload= runs: systemd 252 waits for this command."""
    from agent.daemon import reload_status

    if not math.isfinite(timeout):  # FloatRange lets NaN through, and NaN would end the wait at once
        raise click.BadParameter("must be a finite number of seconds", param_hint="--timeout")

    before = reload_status.read(pid)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CliError("agent_unreachable", f"no process {pid}") from None
    except PermissionError:
        raise CliError("agent_unreachable", f"process {pid} belongs to another user; run as the agent's user") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = reload_status.read(pid)
        if outcome is not None and outcome.seq > (before.seq if before is not None else 0):
            if not outcome.ok:
                raise CliError("reload_failed", f"{outcome.message}; the previous configuration stays in force")
            click.echo(f"reloaded: {outcome.message}")
            return
        time.sleep(0.05)
    raise CliError(
        "reload_unknown",
        f"no answer from process {pid} within {timeout:g}s in {reload_status.status_path(pid)}; see its log",
    )


@click.group("files")
def files() -> None:
    """The packaged example config and systemd units.

    The same files as pkcs11_config/ in the repository, for installs without a checkout."""


@files.command("list")
def list_files() -> None:
    """Names of the shipped files."""
    for name in FILES:
        click.echo(name)


@files.command("print")
@click.argument("name", type=click.Choice(list(FILES)))
def print_file(name: str) -> None:
    """Print one shipped file, e.g. `dfns-agent files print dfns-agent.service`."""
    click.echo(_read(name), nl=False)


@files.command("install")
@click.option(
    "--systemd-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the units go [default: /etc/systemd/system; with --user ~/.config/systemd/user].",
)
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where agent.example.toml goes [default: /etc/dfns-agent; with --user ~/.config/dfns-agent].",
)
@click.option("--user", "user_units", is_flag=True, help="Install the per-user units.")
def install_files(systemd_dir: Path | None, config_dir: Path | None, user_units: bool) -> None:
    """Install the units (mode 0644) and the example config; existing files are left as they are."""
    if user_units:
        systemd_dir = systemd_dir or Path.home() / ".config" / "systemd" / "user"
        config_dir = config_dir or Path.home() / ".config" / "dfns-agent"
    systemd_dir = systemd_dir or Path("/etc/systemd/system")
    config_dir = config_dir or Path("/etc/dfns-agent")
    names = [n for n in FILES if n.startswith("user/") == user_units and n != "agent.example.toml"]
    wanted = {systemd_dir / Path(n).name: n for n in names}
    wanted[config_dir / "agent.example.toml"] = "agent.example.toml"
    for target, name in wanted.items():
        if target.exists() or target.is_symlink():
            click.echo(f"kept {target} (exists)")
            continue
        try:
            installed = _install(target, _read(name).encode("utf-8"))
        except OSError as e:
            hint = "; run it as root, or give --systemd-dir/--config-dir, or --user" if e.errno == errno.EACCES else ""
            raise CliError("install_failed", f"cannot install {target}: {e.strerror or e}{hint}") from None
        click.echo(f"installed {target}" if installed else f"kept {target} (exists)")


def _install(target: Path, data: bytes) -> bool:
    """Put ``data`` at ``target``, mode 0644, whole or not at all, never over a file (or link) already there:
    written beside it and hard-linked into place, so a full disk or an interrupted run leaves no truncated unit
    that a second run would then keep, and a link planted at ``target`` is not written through. False when
    ``target`` appeared meanwhile. Raises OSError."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            return _create(target, data)  # a filesystem without hard links: create it exclusively instead
        return True
    finally:
        os.unlink(tmp)


def _create(target: Path, data: bytes) -> bool:
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        target.unlink(missing_ok=True)  # not a truncated unit that the next run would keep
        raise
    return True


def _read(name: str) -> str:
    return resources.files(_DATA).joinpath(FILES[name]).read_text(encoding="utf-8")
