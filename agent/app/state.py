"""What a SIGHUP may replace as a whole: the credentials (the signing service), the Dfns flow and the policy."""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.policy import Policy
from agent.core.service import SigningService
from agent.dfnsapi.flow import DfnsFlow


@dataclass(frozen=True)
class Generation:
    """One configuration's service, flow and policy; a request reads it once, so it runs against one."""

    service: SigningService
    flow: DfnsFlow
    policy: Policy


class AgentState:
    """The current :class:`Generation`, replaced whole on reload."""

    def __init__(self, generation: Generation) -> None:
        self.current = generation

    def replace(self, generation: Generation) -> None:
        self.current = generation
