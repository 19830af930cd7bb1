"""The agent's HTTP API over its Unix socket: routing, caller identity, policy, JSON in and out.

Handlers only parse, validate and apply the policy; the work happens in
:class:`agent.core.service.SigningService` (on the event loop, or on a thread pool when ``sign_threads`` is set:
PKCS#11 calls block and python-pkcs11 releases the GIL during them) and :class:`agent.dfnsapi.flow.DfnsFlow`. Every
failure leaves as ``{"error": {"code", "message"}}`` with the status its :class:`agent.errors.AgentError`
names. The HTTP protocol itself (parsing, keep-alive, limits) is :mod:`agent.transport.http`.

Every request is tied to the kernel-reported identity of the process on the other end (``SO_PEERCRED``);
a caller the policy does not admit gets 403 on anything, and refusals are audited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any

from agent.app import openapi
from agent.caller import Caller
from agent.config import DfnsConfig
from agent.core.policy import Policy
from agent.core.service import SigningService
from agent.dfnsapi.client import DfnsApi, make_http_client
from agent.dfnsapi.flow import DfnsFlow, in_pool
from agent.errors import AgentError, BadRequest, CircuitOpen, Forbidden
from agent.secret import Secret
from agent.transport.http import Limits, Request, Response, Server, error_response, internal_error, json_response
from agent.transport.listener import peer_of

__all__ = ["ROUTES", "AgentState", "App", "Limits", "create_app", "serve"]

log = logging.getLogger(__name__)

UPSTREAM_HEADER = "X-Dfns-Agent-Upstream"


class AgentState:
    """What a SIGHUP may replace as a whole: credentials (service), Dfns settings (flow) and the policy.

    Requests read the three attributes once, so each runs against one consistent generation.
    """

    def __init__(
        self,
        service: SigningService,
        policy: Policy,
        dfns: Mapping[str, tuple[DfnsConfig, Secret]],
        executor: Executor | None,
    ) -> None:
        self.service = service
        self.policy = policy
        self.dfns = dict(dfns)
        self.executor = executor
        self.flow: DfnsFlow | None = None
        self._http: Any = None

    def bind_http(self, http: Any) -> None:
        self._http = http
        self.flow = self._make_flow(self.service, self.dfns)

    def _make_flow(self, service: SigningService, dfns: Mapping[str, tuple[DfnsConfig, Secret]]) -> DfnsFlow:
        apis = {name: DfnsApi(self._http, cfg, token) for name, (cfg, token) in dfns.items()}
        return DfnsFlow(service, self.executor, apis)

    def replace(self, service: SigningService, policy: Policy, dfns: Mapping[str, tuple[DfnsConfig, Secret]]) -> None:
        flow = self._make_flow(service, dfns) if self._http is not None else None
        self.service, self.policy, self.dfns, self.flow = service, policy, dict(dfns), flow


Endpoint = Callable[["App", Request], Awaitable[Response]]


class App:
    """The agent's routes over one :class:`AgentState`; :meth:`handle` is what :mod:`agent.transport.http` calls."""

    def __init__(self, state: AgentState, limits: Limits) -> None:
        self.state = state
        self.limits = limits
        self._routes: dict[str, dict[str, Endpoint]] = {}
        for method, path, endpoint in ROUTES:
            self._routes.setdefault(path, {})[method] = endpoint

    def _count(self, path: str, status: int) -> None:
        metrics = self.state.service.metrics
        if metrics is not None:
            metrics.request(path if path in self._routes else "other", status)

    def count_protocol_error(self, status: int) -> None:
        """A request refused before it reached a route (malformed, too large, too slow)."""
        self._count("other", status)

    async def handle(self, request: Request) -> Response:
        try:
            response = await self._dispatch(request)
        except AgentError as e:
            response = await self._refuse(request, e)
        except Exception:
            response = internal_error(request.method, request.path)
        self._count(request.path, response.status)
        return response

    async def _dispatch(self, request: Request) -> Response:
        # Admission first: a caller the policy does not admit learns nothing, not even which paths exist.
        request.context["caller"] = caller = self._identify(request)
        self.state.policy.admit(caller)
        methods = self._routes.get(request.path)
        if methods is None:
            return error_response(404, "not_found", f"no endpoint {request.method} {request.path}")
        endpoint = methods.get(request.method)
        if endpoint is None:
            return error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")
        return await endpoint(self, request)

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

    async def _refuse(self, request: Request, e: AgentError) -> Response:
        if isinstance(e, Forbidden):
            caller = request.context.get("caller")
            log.warning("refused %s %s for %s: %s", request.method, request.path, caller, e.message)
            service = self.state.service
            await service.audit_refusal(caller, request.path, e, **request.context.get("audit", {}))
            if service.metrics is not None:
                service.metrics.refusal(e.rule, e.code)
        elif e.status >= 500 and not isinstance(e, CircuitOpen):
            log.warning("%s %s failed: %s", request.method, request.path, e.message)
        return json_response(e.to_json(), e.status)


def _not_json(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and they must never reach a Dfns payload.
    raise ValueError(f"{name} is not JSON")


# One decoder for every request: json.loads builds a new one per call when given parse_constant.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def _json_object(request: Request) -> dict[str, Any]:
    try:
        raw = request.body
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # as json.loads does
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


def _check_fields(body: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - set(body))
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(body) - required - optional)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise BadRequest(f"{key} must be a non-empty string")
    return value


def _required_str(body: Mapping[str, Any], key: str) -> str:
    value = _optional_str(body, key)
    if value is None:
        raise BadRequest(f"{key} must be a non-empty string")
    return value


def _caller(request: Request) -> Caller:
    caller: Caller = request.context["caller"]
    return caller


async def sign(app: App, request: Request) -> Response:
    body = _json_object(request)
    _check_fields(body, {"challenge"}, {"credential"})
    credential = _optional_str(body, "credential")
    state, caller = app.state, _caller(request)
    request.context["audit"] = {"credential": credential}
    grant = state.policy.check(caller, "sign", credential=credential)
    attempt = await in_pool(
        state.executor, state.service.sign_attempt, body["challenge"], credential, caller=caller, grant=grant
    )
    return json_response(await state.service.finish_async(attempt))


async def register(app: App, request: Request) -> Response:
    body = _json_object(request)
    _check_fields(body, {"challenge", "credential"}, {"credId", "credentialName"})
    credential = _required_str(body, "credential")
    state, caller = app.state, _caller(request)
    request.context["audit"] = {"credential": credential}
    state.policy.check(caller, "register", credential=credential)
    attempt = await in_pool(
        state.executor,
        state.service.register_attempt,
        body["challenge"],
        credential,
        cred_id=_optional_str(body, "credId"),
        credential_name=_optional_str(body, "credentialName"),
        caller=caller,
    )
    return json_response(await state.service.finish_async(attempt))


def _flow_input(body: Mapping[str, Any]) -> tuple[str, str, Any, str | None]:
    _check_fields(body, {"method", "path"}, {"body", "credential"})
    method, path = body["method"], body["path"]
    if not isinstance(method, str) or not method.isalpha():
        raise BadRequest("method must be an HTTP method name such as POST")
    if not isinstance(path, str):
        raise BadRequest("path must be a string")
    return method.upper(), path, body.get("body"), _optional_str(body, "credential")


def _flow(app: App) -> DfnsFlow:
    flow = app.state.flow
    assert flow is not None, "the Dfns flow is created when serving starts"
    return flow


def _flow_call(app: App, request: Request) -> tuple[str, str, Any, str | None, Any]:
    method, path, payload, credential = _flow_input(_json_object(request))
    request.context["audit"] = {"credential": credential, "action": {"method": method, "path": path}}
    grant = app.state.policy.check(_caller(request), "dfns", credential=credential, method=method, path=path)
    return method, path, payload, credential, grant


async def user_action(app: App, request: Request) -> Response:
    method, path, payload, credential, grant = _flow_call(app, request)
    result = await _flow(app).user_action(method, path, payload, credential, caller=_caller(request), grant=grant)
    return json_response(result)


async def dfns_request(app: App, request: Request) -> Response:
    method, path, payload, credential, grant = _flow_call(app, request)
    up = await _flow(app).request(method, path, payload, credential, caller=_caller(request), grant=grant)
    headers = {k: v for k, v in up.headers.items() if k.lower() != "content-type"}
    headers[UPSTREAM_HEADER] = "dfns"
    content_type = next((v for k, v in up.headers.items() if k.lower() == "content-type"), "application/octet-stream")
    return Response(up.status, up.content, content_type, headers)


async def register_credential(app: App, request: Request) -> Response:
    body = _json_object(request)
    _check_fields(body, {"credential"}, {"via", "credentialName"})
    credential = _required_str(body, "credential")
    via = _optional_str(body, "via")
    request.context["audit"] = {"credential": credential}
    grant = app.state.policy.check(_caller(request), "register", credential=credential)
    if via is not None:
        grant.require_credential(via)
    result = await _flow(app).register_credential(
        credential, via, _optional_str(body, "credentialName"), caller=_caller(request), grant=grant
    )
    return json_response(result)


async def credentials(app: App, request: Request) -> Response:
    return json_response({"credentials": [c.describe() for c in app.state.service.credentials]})


async def health(app: App, request: Request) -> Response:
    result = await in_pool(app.state.executor, app.state.service.health)
    return json_response(result, 200 if result["status"] == "ok" else 503)


async def metrics_endpoint(app: App, request: Request) -> Response:
    registry = app.state.service.metrics
    if registry is None:
        return error_response(404, "not_found", "metrics are not enabled")
    body, content_type = registry.render()
    return Response(200, body, content_type)


async def openapi_document(app: App, request: Request) -> Response:
    return json_response(openapi.document())


ROUTES: list[tuple[str, str, Endpoint]] = [
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


def create_app(state: AgentState, limits: Limits | None = None) -> App:
    return App(state, limits or Limits())


async def serve(app: App, sock: socket.socket, stop: asyncio.Event, *, shutdown_timeout: float = 10.0) -> None:
    """Serve ``app`` on an already bound, listening socket until ``stop`` is set, then drain in-flight requests
    (at most ``shutdown_timeout`` seconds) and close every connection."""
    http = make_http_client()  # the pooled Dfns client belongs to this event loop: made here, closed on the way out
    app.state.bind_http(http)
    server = Server(app.handle, app.limits, on_protocol_error=app.count_protocol_error)
    try:
        await server.start(sock)
        await stop.wait()
    finally:
        await server.shutdown(shutdown_timeout)
        await http.aclose()
