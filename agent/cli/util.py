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


def socket_option(help: str = "Agent socket path.") -> Callable[[F], F]:  # noqa: A002 - click's own name
    """``--socket PATH``, passed to the command as ``socket_path``."""
    return click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help=help)


def yes(flag: bool) -> str:
    return "yes" if flag else "no"
