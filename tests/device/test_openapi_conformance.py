"""A bounded schemathesis run against the agent's own OpenAPI document, served by a real agent on a real
Unix socket (issue 13): every answer must match what the document says (status, schema, headers such as
``Allow`` on 405), for generated valid and invalid requests, with zero failures.

Bounded so it stays well under a minute: a fixed number of examples per operation, no shrinking deadline.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, settings  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402
from urllib3.connection import HTTPConnection  # noqa: E402
from urllib3.connectionpool import HTTPConnectionPool  # noqa: E402

from agent.app import openapi  # noqa: E402
from agent.dev.testing import (  # noqa: E402
    AgentProcess,
    agent_starter,
    make_token_env,
    shared_template_token,
    short_tempdir,
)

MAX_EXAMPLES = 40  # per operation


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__("agent", **kwargs)
        self._unix_path = path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(self._unix_path)
        return sock


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("agent")
        self._unix_path = path

    def _new_conn(self) -> HTTPConnection:
        return _UnixConnection(self._unix_path)


class UnixAdapter(HTTPAdapter):
    """requests over a Unix socket: every URL goes to ``path`` (the host part is ignored)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._pool = _UnixPool(str(path))

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> Any:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


_live: dict[str, Any] = {}


@pytest.fixture(scope="module")
def live_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    template = shared_template_token(lambda: tmp_path_factory.mktemp("template"))
    te = make_token_env(template, tmp_path_factory.mktemp("schemathesis") / "hsm")
    with short_tempdir() as d, agent_starter(d) as start:
        agent = start(te)
        session = requests.Session()
        session.mount("http://", UnixAdapter(agent.socket_path))
        _live["session"] = session
        yield agent
        session.close()


# The document is built in process at collection time; the first test checks that it is the one served.
# Schema-valid requests may still be unprocessable here (422: a challenge allowing none of the agent's
# credentials, a credential without Dfns settings): that is an answer, not a rejection of valid data.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "422", "429", "5xx"]}
        }
    }
)
schema = schemathesis.openapi.from_dict(openapi.document(), config=CONFIG)


def test_the_document_is_the_one_the_agent_serves(live_agent: AgentProcess) -> None:
    assert live_agent.http.get("/v1/openapi.json").json() == openapi.document()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_agent_answers_as_its_openapi_document_says(case: Any, live_agent: AgentProcess) -> None:
    case.call_and_validate(session=_live["session"], base_url="http://agent")
