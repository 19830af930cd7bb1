"""The ``dfns-agent`` command line: the group, its global options, ``serve``, and every command registered.

The commands live beside this file by what they touch: ``keys.py`` (the token), ``remote.py`` (a running
agent), ``audit.py``, ``doctor.py`` and ``dev.py``; ``util.py`` holds what they share. Errors are turned
into one line on stderr here, in :class:`_Group`, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import click

from agent import __version__, logs
from agent.cli import audit, dev, doctor, keys, remote
from agent.cli.util import Context, socket_option
from agent.client import AgentClientError
from agent.errors import AgentError, ConfigError


class _Group(click.Group):
    """The one error handler: the agent's own errors and a running agent's refusals become one clear line
    on stderr and a non-zero exit (2 for a config error, as for a usage error; else 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentError as e:
            click.echo(f"dfns-agent: error: {e.message}", err=True)
            ctx.exit(2 if isinstance(e, ConfigError) else 1)
        except AgentClientError as e:
            click.echo(f"dfns-agent: {e.code}: {e.message}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Agent config (TOML). Default: $DFNS_AGENT_CONFIG, ~/.config/dfns-agent/agent.toml, "
    "/etc/dfns-agent/agent.toml.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(__version__, prog_name="dfns-agent")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Sign Dfns user-action challenges with keys that never leave a PKCS#11 token."""
    logs.configure(verbose)
    ctx.obj = Context(config_path, verbose)


@main.command()
@socket_option(help="Override the socket path.")
@click.pass_obj
def serve(obj: Context, socket_path: str | None) -> None:
    """Run the agent: log in to the token once and serve signing requests on the Unix socket."""
    from agent.daemon import run as daemon

    config = obj.config
    logs.configure(obj.verbose, fmt=config.logging.format, level=config.logging.level)
    daemon.run(config, socket_override=socket_path)


for command in (
    keys.keys,
    remote.sign,
    remote.request,
    remote.register,
    doctor.doctor,
    remote.status,
    audit.audit,
    dev.dev_dfns,
):
    main.add_command(command)
