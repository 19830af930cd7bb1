"""What the command modules share: the context object, the ``--socket`` option, the agent client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from agent.client import AgentClient
from agent.config import Config, find_config, load_config
from agent.errors import ConfigError
from agent.paths import socket_path_for
from agent.token import Token

F = TypeVar("F", bound=Callable[..., object])


class Context:
    """The group's options, for every command: the config is loaded on first use, so commands that do not
    need one (``audit verify``, ``dev-dfns``) work without it and ``doctor`` can report why it is broken."""

    def __init__(self, config_path: str | None, verbose: bool = False) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def open_token(self, *, rw: bool = False) -> Token:
        from agent.secret import read_pin

        cfg = self.config.token
        return Token.open(cfg, read_pin(cfg), rw=rw)

    def client(self, socket_path: str | None) -> AgentClient:
        """A client for the running agent: ``--socket``, else the configured socket, else the default one."""
        return AgentClient(self.socket(socket_path))

    def socket(self, explicit: str | None) -> Path:
        if explicit:
            return Path(explicit)
        try:
            find_config(self.config_path)
        except ConfigError:
            return socket_path_for(None)  # no config file anywhere: the default socket path
        return socket_path_for(self.config)


CONFIG_HELP = (
    "Agent config (TOML). Default: $DFNS_AGENT_CONFIG, ~/.config/dfns-agent/agent.toml, /etc/dfns-agent/agent.toml."
)


def _set_config_path(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    obj = ctx.find_object(Context)
    if obj is None:  # a command run on its own, outside the group
        ctx.obj = Context(value)
    else:
        obj.config_path = value


def config_option() -> click.Option:
    """``--config PATH`` after a command (``dfns-agent serve --config X``): the group's option, accepted there
    too; it sets the context's config path, and wins over one given before the command."""
    return click.Option(
        ["--config"],
        type=click.Path(dir_okay=False),
        expose_value=False,
        callback=_set_config_path,
        help=CONFIG_HELP.replace("Agent config (TOML).", "Agent config (TOML); also accepted before the command."),
    )


def add_config_option(command: click.Command) -> None:
    """Give ``command`` (and, for a group, each of its subcommands) the shared ``--config``."""
    if not any(isinstance(p, click.Option) and "--config" in p.opts for p in command.params):
        command.params.append(config_option())
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_config_option(sub)


# The rules of agent/paths.py in words, for help texts (tests/unit/test_cli_help.py holds them to it).
SOCKET_DEFAULT = (
    "[server] socket in the config, else $XDG_RUNTIME_DIR/dfns-agent/agent.sock, "
    "else ${TMPDIR:-/tmp}/dfns-agent-$UID/agent.sock"
)
AUDIT_DEFAULT = (
    "[audit] file in the config, else /var/lib/dfns-agent/audit.jsonl for root (when $XDG_STATE_HOME is unset), "
    "else ${XDG_STATE_HOME:-~/.local/state}/dfns-agent/audit.jsonl"
)


def socket_option(help: str = "Agent socket path.") -> Callable[[F], F]:  # noqa: A002 - click's own name
    """``--socket PATH``, passed to the command as ``socket_path``; its help shows the computed default."""
    return click.option(
        "--socket", "socket_path", type=click.Path(dir_okay=False), help=help, show_default=SOCKET_DEFAULT
    )


class CliError(Exception):
    """Input a command cannot use (stdin that is not JSON, …): printed by the group in ``main.py`` in the same
    style as the agent's own errors, ``dfns-agent: CODE: MESSAGE``."""

    def __init__(self, code: str, message: str, *, exit_code: int = 1) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.exit_code = code, message, exit_code


def yes(flag: bool) -> str:
    return "yes" if flag else "no"
