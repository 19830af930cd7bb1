"""Who may use the agent, and for what.

Identity comes from the kernel (``SO_PEERCRED`` on the Unix socket), never from the request. By default
only the agent's own uid and root may connect, as with ssh-agent. ``[[policy.rule]]`` tables admit more
callers (by uid, gid or executable) and restrict what they may do: which credentials, which Dfns methods
and paths (for ``/v1/user-action`` and ``/v1/request``), and how often. The first rule that matches a
caller applies; the agent's own uid and root are unrestricted unless a rule names them.

``/v1/sign`` signs a challenge for *any* action (the action is inside the challenge), so a rule that
restricts methods or paths also forbids ``/v1/sign`` unless it says ``allow_sign = true``.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from agent.caller import Caller
from agent.config import Rule
from agent.core.ratelimit import Buckets, LocalBuckets
from agent.errors import Forbidden, RateLimited


@functools.lru_cache(maxsize=1024)
def _path_pattern(pattern: str) -> re.Pattern[str]:
    parts = []
    for token in re.split(r"(\*\*|\*|\?)", pattern):
        if token == "**":
            parts.append(".+")  # one or more whole segments, slashes included
        elif token == "*":
            parts.append("[^/]+")  # within one segment
        elif token == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


def path_matches(pattern: str, path: str) -> bool:
    """A rule's path pattern against a Dfns path (without its query): ``*`` matches within one segment (it
    never crosses ``/``), ``**`` across several, ``?`` one character of a segment; the rest is literal.
    The path has been checked first (``agent.dfnsapi.flow.check_path``: no empty, dot or encoded segments)."""
    return _path_pattern(pattern).fullmatch(path) is not None


class Endpoint(str, Enum):
    """What a request asks the agent to do, as the policy sees it."""

    SIGN = "sign"  # /v1/sign: a challenge for any action
    REGISTER = "register"  # /v1/register, POST /v1/credentials
    DFNS = "dfns"  # /v1/user-action, /v1/request: one Dfns method and path


@dataclass(frozen=True)
class Grant:
    """What a request may do: ``credentials`` None means any configured credential.

    The one place that says whether a credential is allowed: the policy checks a named one up front, and
    the signing service and the flow ask again when they pick one themselves.
    """

    rule: str | None
    credentials: frozenset[str] | None = None

    def allows(self, name: str) -> bool:
        return self.credentials is None or name in self.credentials

    def require_credential(self, name: str) -> None:
        if not self.allows(name):
            raise Forbidden(f"rule {self.rule!r} does not allow credential {name!r}", rule=self.rule or "default")


UNRESTRICTED = Grant(rule=None)  # no rule applies: any configured credential (immutable, so shared)


@dataclass
class Policy:
    rules: Sequence[Rule] = ()
    own_uid: int = field(default_factory=os.geteuid)
    clock: Callable[[], float] = time.monotonic
    buckets: Buckets = field(default_factory=LocalBuckets)  # the agent's workers share agent.core.ratelimit.SHARED

    def rule_for(self, caller: Caller) -> Rule | None:
        return next((r for r in self.rules if r.matches(caller)), None)

    def admit(self, caller: Caller) -> Rule | None:
        """May this caller talk to the agent at all? Returns the rule that governs it (None: unrestricted)."""
        rule = self.rule_for(caller)
        if rule is None and caller.uid not in (self.own_uid, 0):
            raise Forbidden(
                f"uid {caller.uid} may not use this agent: only uid {self.own_uid}, root and callers matched by a "
                "[[policy.rule]] may"
            )
        return rule

    def check(
        self,
        caller: Caller,
        endpoint: Endpoint,
        *,
        credential: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> Grant:
        """Raise Forbidden / RateLimited, naming the rule, or return what the request may use."""
        rule = self.admit(caller)
        if rule is None:
            return UNRESTRICTED
        if endpoint == Endpoint.SIGN and not rule.sign_allowed:
            raise Forbidden(
                f"rule {rule.name!r} restricts Dfns actions, so it does not allow /v1/sign "
                "(allow_sign = true permits it)",
                rule=rule.name,
            )
        if endpoint == Endpoint.REGISTER and not rule.allow_register:
            raise Forbidden(
                f"rule {rule.name!r} does not allow registering credentials (allow_register)", rule=rule.name
            )
        grant = Grant(rule=rule.name, credentials=rule.credentials)
        if credential is not None:
            grant.require_credential(credential)
        if method is not None and rule.methods is not None and method.upper() not in rule.methods:
            raise Forbidden(f"rule {rule.name!r} does not allow method {method.upper()}", rule=rule.name)
        if path is not None and rule.paths is not None:
            bare = path.split("?", 1)[0]
            if not any(path_matches(pattern, bare) for pattern in rule.paths):
                raise Forbidden(f"rule {rule.name!r} does not allow path {bare}", rule=rule.name)
        self._take(rule, caller)
        return grant

    def _take(self, rule: Rule, caller: Caller) -> None:
        if rule.rate is None:
            return
        burst = float(rule.burst if rule.burst is not None else max(1, int(rule.rate)))
        if not self.buckets.take(rule.name, caller.uid, rule.rate, burst, self.clock()):
            raise RateLimited(
                f"rule {rule.name!r} allows {rule.rate:g} requests/s (burst {burst:g}) for each uid, across all "
                "workers; slow down",
                rule=rule.name,
            )
