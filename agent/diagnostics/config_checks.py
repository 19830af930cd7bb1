"""The config: loading it (it names the module, so nothing else can be checked without it) and what it holds."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import Config, find_config, load_config
from agent.diagnostics.results import Check, failed, passed
from agent.errors import ConfigError

# Named in fixes: it documents every setting (a checkout's file; `dfns-agent files print` has the packaged copy).
EXAMPLE = "`dfns-agent files print agent.example.toml` (pkcs11_config/agent.example.toml in a checkout)"
_NO_ACCESS = (
    "run the doctor as the agent's user (the config must be readable by it), or for a systemd service as root: "
    "sudo dfns-agent --config FILE doctor --unit dfns-agent.service"
)


@dataclass(frozen=True)
class Loaded:
    """The config, or the failed check that says why there is none."""

    config: Config | None
    problem: Check | None = None


def load(config_path: str | None) -> Loaded:
    """Find and load the config as ``serve`` does; a failure is a check with its fix, not an exception."""
    try:
        path = find_config(config_path)
    except OSError as e:  # a default location in a directory this user may not look into
        return Loaded(None, failed("config", f"cannot look for the configuration file: {e}", _NO_ACCESS))
    except ConfigError as e:
        return Loaded(
            None, failed("config", e.message, "pass --config PATH, set DFNS_AGENT_CONFIG, or create that file")
        )
    try:
        return Loaded(load_config(path))
    except ConfigError as e:
        fix = f"correct {path} ({EXAMPLE} documents every setting), then run the doctor again"
        try:
            missing = not path.exists()
        except OSError:  # e.g. /etc/dfns-agent is 0750 root:dfns-agent and this user is not in the group
            return Loaded(None, failed("config", e.message, _NO_ACCESS))
        if missing:
            fix = f"create {path} (start from {EXAMPLE}) or pass the right --config"
        return Loaded(None, failed("config", e.message, fix))


def check_config_summary(config: Config) -> Check:
    """load_config already enforced structure and that rules name known credentials: this states it."""
    with_dfns = sum(1 for c in config.credentials if c.dfns is not None)
    rules = (
        f"{len(config.rules)} policy rule(s), all naming configured credentials"
        if config.rules
        else "no policy rules (only this uid and root may use the agent)"
    )
    detail = f"{config.path}: {len(config.credentials)} credential(s) ({with_dfns} with Dfns settings), {rules}"
    return passed("config", detail)
