"""Metrics labels come only from the configuration (issue 13): names a caller makes up never become series."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.config import Rule
from agent.dev.testing import make_challenge
from agent.transport.http import Response
from tests.unit.test_routes import CREDS, NOBODY, Agent


def series(agent: Agent, metric: str) -> list[str]:
    text = agent.metrics.render()[0].decode()
    return [line for line in text.splitlines() if line.startswith(metric + "{")]


def test_made_up_credential_names_are_counted_under_one_fixed_label(tmp_path: Path) -> None:
    rule = Rule("ops", uids=frozenset({NOBODY}), credentials=frozenset({"ed"}))
    agent = Agent(tmp_path, rules=(rule,))
    made_up = [f"made-up-{i}" for i in range(50)]

    async def script(ask: Callable[..., Awaitable[Response]]) -> list[int]:
        statuses = []
        for name in made_up:
            r = await ask("POST", "/v1/sign", {"challenge": make_challenge(CREDS["ed"][2]), "credential": name})
            statuses.append(r.status)
        statuses.append((await ask("POST", "/v1/sign", {"challenge": make_challenge(CREDS["ed"][2])})).status)
        return statuses

    statuses = agent.session(script)
    assert set(statuses[:-1]) == {404} and statuses[-1] == 200
    lines = series(agent, "dfns_agent_signatures_total") + series(agent, "dfns_agent_refusals_total")
    lines += series(agent, "dfns_agent_http_requests_total")
    assert lines and not any("made-up" in line for line in lines), lines
    credentials = {line.split('credential="', 1)[1].split('"', 1)[0] for line in lines if 'credential="' in line}
    assert credentials <= {"", "ed", "p256"}, credentials
    agent.audit.close()


def test_refusals_are_labelled_by_configured_rule_or_the_built_in_check(tmp_path: Path) -> None:
    agent = Agent(tmp_path, rules=(Rule("ops", uids=frozenset({NOBODY}), credentials=frozenset({"ed"})),))

    async def script(ask: Callable[..., Awaitable[Any]]) -> None:
        for name in ("p256", "p256", "ed"):
            await ask("POST", "/v1/sign", {"challenge": make_challenge(CREDS[name][2]), "credential": name})

    agent.session(script, stranger=True)
    rules = {line.split('rule="', 1)[1].split('"', 1)[0] for line in series(agent, "dfns_agent_refusals_total")}
    assert rules == {"ops"}, rules
    agent.audit.close()
