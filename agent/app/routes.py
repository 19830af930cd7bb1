"""The agent's HTTP API over its Unix socket: routing, caller identity, policy, JSON in and out.

Handlers only parse, apply the policy and call :class:`agent.core.service.SigningService` or
:class:`agent.dfnsapi.flow.DfnsFlow`, which do the work. Every failure leaves as
``{"error": {"code", "message"}}`` with the status its :class:`agent.errors.AgentError` names. The HTTP
protocol itself (parsing, keep-alive, limits) is ``agent/transport/http.py``.

Every request is tied to the kernel-reported identity of the process on the other end (``SO_PEERCRED``);
a caller the policy does not admit gets 403 on anything, and refusals are audited.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.app import openapi
from agent.app.bodies import RegisterBody, RegisterCredentialBody, SignBody, dfns_call
from agent.app.state import AgentState, Generation
from agent.caller import Caller
from agent.config import Rule
from agent.core.policy import Endpoint as PolicyEndpoint
from agent.core.policy import Grant
from agent.core.records import Action
from agent.core.service import SigningService
from agent.errors import AgentError, CircuitOpen, Forbidden
from agent.transport.http import (
    Admission,
    Limits,
    Request,
    Response,
    error_response,
    internal_error,
    json_response,
)
from agent.transport.listener import peer_of, same_process

__all__ = ["ROUTES", "App", "Limits"]

log = logging.getLogger(__name__)

UPSTREAM_HEADER = "X-Dfns-Agent-Upstream"


@dataclass
class _Refusal:
    """What a refused request had asked for, so the audit record of the refusal can say it."""

    credential: str | None = None
    action: Action | None = None


@dataclass
class _Call:
    """One request as the routes see it: who asks, against which configuration."""

    request: Request
    caller: Caller
    now: Generation
    refusal: _Refusal

    def check(self, endpoint: PolicyEndpoint, credential: str | None, action: Action | None = None) -> Grant:
        """The policy's word on this request; remembers what it asked for, should it be refused."""
        self.refusal.credential, self.refusal.action = credential, action
        method, path = (action.method, action.path) if action is not None else (None, None)
        return self.now.policy.check(self.caller, endpoint, credential=credential, method=method, path=path)


Route = Callable[[_Call], Awaitable[Response]]


class App:
    """The agent's routes over one :class:`AgentState`; :meth:`handle` is what the HTTP server calls."""

    def __init__(self, state: AgentState, limits: Limits | None = None) -> None:
        self.state = state
        self.limits = limits or Limits()
        self._routes: dict[str, dict[str, Route]] = {}
        for method, path, route in ROUTES:
            self._routes.setdefault(path, {})[method] = route
        self._refusal_records: set[asyncio.Task[None]] = set()

    def admit_connection(self, caller: Caller) -> Admission:
        """At accept, from the peer's credentials alone: refuse (answered and closed at once, audited) a
        caller no rule admits; connections an ``exes`` rule governs have every byte's writer checked."""
        now = self.state.current
        try:
            rule = now.policy.admit(caller)
        except Forbidden as e:
            service = now.service
            if service.metrics is not None:
                service.metrics.refusal(e.rule, e.code)
            task = asyncio.get_running_loop().create_task(_refused_connection(service, caller, e))
            self._refusal_records.add(task)
            task.add_done_callback(self._refusal_records.discard)
            return Admission(refusal=json_response(e.to_json(), e.status))
        return Admission(check_sender=rule is not None and bool(rule.exes))

    def _count(self, path: str, status: int) -> None:
        metrics = self.state.current.service.metrics
        if metrics is not None:
            metrics.request(path if path in self._routes else "other", status)

    def count_protocol_error(self, status: int) -> None:
        """A request refused before it reached a route (malformed, too large, too slow)."""
        self._count("other", status)

    async def handle(self, request: Request) -> Response:
        now = self.state.current  # one generation for the whole request, even across a reload
        refusal = _Refusal()
        caller: Caller | None = None
        try:
            # Admission first: a caller the policy does not admit learns nothing, not even which paths exist.
            caller = self._identify(request)
            rule = now.policy.admit(caller)
            if rule is not None and rule.exes:
                self._check_executable(request, caller, rule)
            response = await self._dispatch(_Call(request, caller, now, refusal))
        except AgentError as e:
            response = await self._refuse(request, now, caller, refusal, e)
        except Exception:
            response = internal_error(request.method, request.path)
        self._count(request.path, response.status)
        return response

    async def _dispatch(self, call: _Call) -> Response:
        request = call.request
        methods = self._routes.get(request.path)
        if methods is None:
            return error_response(404, "not_found", f"no endpoint {request.method} {request.path}")
        route = methods.get(request.method)
        if route is None:
            refused = error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")
            refused.headers["Allow"] = ", ".join(sorted(methods))  # RFC 9110: a 405 says what is allowed
            return refused
        return await route(call)

    @staticmethod
    def _identify(request: Request) -> Caller:
        """Who is calling (SO_PEERCRED)? A connection's peer does not change, so it is looked up once."""
        context = request.connection.context
        caller: Caller | None = context.get("caller")
        if caller is None:
            sock = request.connection.socket
            if sock is None or sock.family != socket.AF_UNIX:
                raise Forbidden("the agent only serves local callers over its Unix socket")
            caller = context["caller"] = peer_of(sock)
        return caller

    @staticmethod
    def _check_executable(request: Request, caller: Caller, rule: Rule) -> None:
        """A rule that selects by executable holds only while the connection's every byte came from the process
        that connected (checked by the transport) and that process still runs what it ran at accept."""
        if not request.connection.context.get("sender_checked"):
            raise Forbidden(
                f"rule {rule.name!r} selects callers by executable, which this connection was not checked for "
                "(the policy changed since it was opened): open a new connection",
                rule=rule.name,
            )
        if not same_process(caller):
            raise Forbidden(
                f"rule {rule.name!r}: the process that connected (pid {caller.pid}) no longer runs {caller.exe}",
                rule=rule.name,
            )

    async def _refuse(
        self, request: Request, now: Generation, caller: Caller | None, refusal: _Refusal, e: AgentError
    ) -> Response:
        if isinstance(e, Forbidden):
            service = now.service
            first = await service.audit_refusal(
                caller, request.path, e, credential=refusal.credential, action=refusal.action
            )
            # Logged like the audit aggregates: the first per caller and reason in an interval, the rest at debug.
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "refused %s %s for %s: %s",
                request.method,
                request.path,
                caller,
                e.message,
            )
            if service.metrics is not None:
                service.metrics.refusal(e.rule, e.code)
        elif e.status >= 500 and not isinstance(e, CircuitOpen):
            log.warning("%s %s failed: %s", request.method, request.path, e.message)
        return json_response(e.to_json(), e.status)


async def sign(call: _Call) -> Response:
    body = SignBody.parse(call.request.body)
    grant = call.check(PolicyEndpoint.SIGN, body.credential)
    assertion = await call.now.service.sign(body.challenge, body.credential, caller=call.caller, grant=grant)
    return json_response(assertion.to_json())


async def register(call: _Call) -> Response:
    body = RegisterBody.parse(call.request.body)
    grant = call.check(PolicyEndpoint.REGISTER, body.credential)
    registration = await call.now.service.register(
        body.challenge,
        body.credential,
        cred_id=body.cred_id,
        credential_name=body.credential_name,
        caller=call.caller,
        grant=grant,
    )
    return json_response(registration.to_json())


async def user_action(call: _Call) -> Response:
    dfns = dfns_call(call.request.body)
    grant = call.check(PolicyEndpoint.DFNS, dfns.credential, dfns.action)
    return json_response((await call.now.flow.user_action(dfns, caller=call.caller, grant=grant)).to_json())


async def dfns_request(call: _Call) -> Response:
    dfns = dfns_call(call.request.body)
    grant = call.check(PolicyEndpoint.DFNS, dfns.credential, dfns.action)
    up = await call.now.flow.request(dfns, caller=call.caller, grant=grant)
    headers = {k: v for k, v in up.headers.items() if k.lower() != "content-type"}
    headers[UPSTREAM_HEADER] = "dfns"
    content_type = next((v for k, v in up.headers.items() if k.lower() == "content-type"), "application/octet-stream")
    return Response(up.status, up.content, content_type, headers)


async def register_credential(call: _Call) -> Response:
    body = RegisterCredentialBody.parse(call.request.body)
    grant = call.check(PolicyEndpoint.REGISTER, body.credential)
    registered = await call.now.flow.register_credential(
        body.credential, body.via, body.credential_name, caller=call.caller, grant=grant
    )
    return json_response(registered.credential, registered.status)


async def credentials(call: _Call) -> Response:
    return json_response({"credentials": [c.to_json() for c in call.now.service.credentials]})


async def health(call: _Call) -> Response:
    result = await call.now.service.health()
    return json_response(result.to_json(), 200 if result.ok else 503)


async def metrics_endpoint(call: _Call) -> Response:
    registry = call.now.service.metrics
    if registry is None:
        return error_response(404, "not_found", "metrics are not enabled")
    body, content_type = registry.render()
    return Response(200, body, content_type)


async def openapi_document(call: _Call) -> Response:
    return json_response(openapi.document())


ROUTES: list[tuple[str, str, Route]] = [
    ("POST", "/v1/sign", sign),
    ("POST", "/v1/register", register),
    ("GET", "/v1/credentials", credentials),
    ("POST", "/v1/credentials", register_credential),
    ("POST", "/v1/user-action", user_action),
    ("POST", "/v1/request", dfns_request),
    ("GET", "/v1/health", health),
    ("GET", "/v1/metrics", metrics_endpoint),
    ("GET", "/v1/openapi.json", openapi_document),
]


async def _refused_connection(service: SigningService, caller: Caller, e: Forbidden) -> None:
    first = await service.audit_refusal(caller, "connect", e)
    log.log(logging.WARNING if first else logging.DEBUG, "refused a connection of %s: %s", caller, e.message)
