"""Commands for running the agent as a service: ``reload`` (the units' ``ExecReload=``) and ``files``, which
prints or installs the example config and the systemd units shipped inside the package, so a
``pip install dfns-agent`` has them without a checkout."""

from __future__ import annotations

import os
import signal
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
@click.option("--pid", type=int, required=True, help="The agent's main process (in a unit: $MAINPID).")
@click.option("--timeout", type=float, default=90.0, show_default=True, help="Seconds to wait for the outcome.")
def reload(pid: int, timeout: float) -> None:
    """Reload a running agent; wait for every worker.

    Exit 0 once every worker has applied the new config, 1 if it was refused (with why; the running config
    stays). What the units' ExecReload= runs: systemd 252 waits for this command."""
    from agent.daemon import reload_status

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
        if target.exists():
            click.echo(f"kept {target} (exists)")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_read(name), encoding="utf-8")
        target.chmod(0o644)
        click.echo(f"installed {target}")


def _read(name: str) -> str:
    return resources.files(_DATA).joinpath(FILES[name]).read_text(encoding="utf-8")
