"""The ``dfns-agent`` command line: the group, its global options, ``serve``, and every command registered.

The commands live beside this file by what they touch: ``keys.py`` (the token), ``remote.py`` (a running
agent), ``audit.py``, ``doctor.py`` and ``dev.py``; ``util.py`` holds what they share. Errors are turned
into one line on stderr here, in :class:`_Group`, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import click

from agent import __version__, logs
from agent.cli import audit, dev, doctor, keys, remote, service
from agent.cli.util import AUDIT_DEFAULT, CONFIG_HELP, CliError, Context, add_config_option, socket_option
from agent.client import AgentClientError
from agent.errors import AgentError, exit_status_for


class _Group(click.Group):
    """The one error handler: the agent's own errors, a running agent's refusals and input a command cannot
    use become one line on stderr, ``dfns-agent: CODE: MESSAGE``, and a non-zero exit
    (:class:`agent.errors.ExitStatus`: 2 for a config or secret-source error, as for a usage error; 77 for a
    rejected or locked PIN; else 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentError as e:
            _error(e.code, e.message)
            ctx.exit(exit_status_for(e))
        except AgentClientError as e:
            _error(e.code, e.message)
            ctx.exit(1)
        except CliError as e:
            _error(e.code, e.message)
            ctx.exit(e.exit_code)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        add_config_option(cmd)  # `dfns-agent serve --config X` works as `dfns-agent --config X serve`
        super().add_command(cmd, name)


def _error(code: str, message: str) -> None:
    click.echo(f"dfns-agent: {code}: {message}", err=True)


@click.group(cls=_Group)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(__version__, prog_name="dfns-agent")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Sign Dfns user-action challenges with keys that never leave a PKCS#11 token.

    `dfns-agent COMMAND --help` shows a command's options; --config may come before or after COMMAND.
    """
    logs.configure(verbose)
    ctx.obj = Context(config_path, verbose)


@main.command(
    help="Run the agent on its Unix socket.\n\n"
    "It logs in to the token once and serves signing requests until SIGTERM or Ctrl-C; SIGHUP reloads "
    "credentials, Dfns settings and policy.\n\n"
    f"Every signature and refusal is appended to the audit log before the answer leaves: {AUDIT_DEFAULT}."
)
@socket_option(help="Socket to listen on.")
@click.pass_obj
def serve(obj: Context, socket_path: str | None) -> None:
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
    service.reload,
    service.files,
):
    main.add_command(command)
