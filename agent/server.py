"""HTTP/1.1 + JSON over the Unix socket, served by aiohttp.

Handlers only parse, validate and apply the policy; the work happens in
:class:`agent.service.SigningService` (on a thread pool, because PKCS#11 calls block and python-pkcs11
releases the GIL during them) and :class:`agent.flow.DfnsFlow`. Every failure leaves as
``{"error": {"code", "message"}}`` with the status its :class:`agent.errors.AgentError` names.

Every request is tied to the kernel-reported identity of the process on the other end (``SO_PEERCRED``);
a caller the policy does not admit gets 403 on anything, and refusals are audited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import weakref
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from aiohttp import web

from agent import openapi
from agent.config import DfnsConfig
from agent.dfns_client import DfnsApi, make_http_client
from agent.errors import AgentError, BadRequest, CircuitOpen, PayloadTooLarge
from agent.flow import DfnsFlow, in_pool
from agent.policy import Caller, Forbidden, Policy, peer_of
from agent.secret import Secret
from agent.service import SigningService

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout

log = logging.getLogger(__name__)

T = TypeVar("T")
UPSTREAM_HEADER = "X-Dfns-Agent-Upstream"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}


class RequestTimeout(AgentError):
    code = "request_timeout"
    status = 408


@dataclass
class Limits:
    max_body: int = 64 * 1024
    body_timeout: float = 10.0
    idle_timeout: float = 15.0
    max_connections: int = 256


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


STATE: web.AppKey[AgentState] = web.AppKey("state", AgentState)
LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
CALLER = "dfns_agent_caller"


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


_ENDPOINTS = frozenset(
    (
        "/v1/sign",
        "/v1/register",
        "/v1/credentials",
        "/v1/user-action",
        "/v1/request",
        "/v1/health",
        "/v1/openapi.json",
        "/v1/metrics",
    )
)


def _count(request: web.Request, status: int) -> None:
    metrics = request.app[STATE].service.metrics
    if metrics is not None:
        endpoint = request.path if request.path in _ENDPOINTS else "other"
        metrics.requests.labels(endpoint, str(status)).inc()


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
        _count(request, response.status)
        return response
    except AgentError as e:
        _count(request, e.status)
        if isinstance(e, Forbidden):
            caller = request.get(CALLER)
            log.warning("refused %s %s for %s: %s", request.method, request.path, caller, e.message)
            await request.app[STATE].service.audit_refusal(caller, request.path, e, **request.get("audit", {}))
            metrics = request.app[STATE].service.metrics
            if metrics is not None:
                metrics.refusals.labels(e.rule, e.code).inc()
        elif e.status >= 500 and not isinstance(e, CircuitOpen):
            log.warning("%s %s failed: %s", request.method, request.path, e.message)
        return web.json_response(e.to_json(), status=e.status)
    except web.HTTPRequestEntityTooLarge:
        e2 = PayloadTooLarge(f"request body is larger than {request.app[LIMITS].max_body} bytes")
        return error_response(e2.status, e2.code, e2.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        if e.status == 404:
            message = f"no endpoint {request.method} {request.path}"
        elif e.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = e.reason
        return error_response(e.status, code, message)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the agent's log")


# The peer of a connection does not change while it is open: look it up once per connection.
_callers: weakref.WeakKeyDictionary[asyncio.BaseTransport, Caller] = weakref.WeakKeyDictionary()


@web.middleware
async def _identify(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Who is calling (SO_PEERCRED), and may they talk to the agent at all?"""
    transport = request.transport
    caller = _callers.get(transport) if transport is not None else None
    if caller is None:
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None or sock.family != socket.AF_UNIX:
            raise Forbidden("the agent only serves local callers over its Unix socket")
        caller = _callers[transport] = peer_of(sock)
    request[CALLER] = caller
    request.app[STATE].policy.admit(caller)
    return await handler(request)


def _not_json(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and they must never reach a Dfns payload.
    raise ValueError(f"{name} is not JSON")


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        if request.content.is_eof():  # the usual case: the whole (small) body came with the headers
            raw = await request.read()
        else:
            async with timeout(request.app[LIMITS].body_timeout):
                raw = await request.read()
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request body not received within {request.app[LIMITS].body_timeout:g}s") from None
    except ConnectionError:
        # The client went away mid-body: nobody is left to answer, but it is their fault, not ours.
        raise BadRequest("the request body ended early (connection closed)", code="incomplete_request") from None
    try:
        body = json.loads(raw, parse_constant=_not_json)
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


def _caller(request: web.Request) -> Caller:
    caller: Caller = request[CALLER]
    return caller


async def _in_pool(request: web.Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await in_pool(request.app[STATE].executor, fn, *args, **kwargs)


async def sign(request: web.Request) -> web.Response:
    body = await _json_object(request)
    _check_fields(body, {"challenge"}, {"credential"})
    credential = _optional_str(body, "credential")
    state, caller = request.app[STATE], _caller(request)
    request["audit"] = {"credential": credential}
    grant = state.policy.check(caller, "sign", credential=credential)
    attempt = await _in_pool(
        request, state.service.sign_attempt, body["challenge"], credential, caller=caller, grant=grant
    )
    return web.json_response(await state.service.finish_async(attempt))


async def register(request: web.Request) -> web.Response:
    body = await _json_object(request)
    _check_fields(body, {"challenge", "credential"}, {"credId", "credentialName"})
    credential = _required_str(body, "credential")
    state, caller = request.app[STATE], _caller(request)
    request["audit"] = {"credential": credential}
    state.policy.check(caller, "register", credential=credential)
    attempt = await _in_pool(
        request,
        state.service.register_attempt,
        body["challenge"],
        credential,
        cred_id=_optional_str(body, "credId"),
        credential_name=_optional_str(body, "credentialName"),
        caller=caller,
    )
    return web.json_response(await state.service.finish_async(attempt))


def _flow_input(body: Mapping[str, Any]) -> tuple[str, str, Any, str | None]:
    _check_fields(body, {"method", "path"}, {"body", "credential"})
    method, path = body["method"], body["path"]
    if not isinstance(method, str) or not method.isalpha():
        raise BadRequest("method must be an HTTP method name such as POST")
    if not isinstance(path, str):
        raise BadRequest("path must be a string")
    return method.upper(), path, body.get("body"), _optional_str(body, "credential")


def _flow(request: web.Request) -> DfnsFlow:
    flow = request.app[STATE].flow
    assert flow is not None, "the Dfns flow is created at start-up"
    return flow


async def _flow_call(request: web.Request) -> tuple[str, str, Any, str | None, Any]:
    method, path, payload, credential = _flow_input(await _json_object(request))
    request["audit"] = {"credential": credential, "action": {"method": method, "path": path}}
    grant = request.app[STATE].policy.check(_caller(request), "dfns", credential=credential, method=method, path=path)
    return method, path, payload, credential, grant


async def user_action(request: web.Request) -> web.Response:
    method, path, payload, credential, grant = await _flow_call(request)
    result = await _flow(request).user_action(method, path, payload, credential, caller=_caller(request), grant=grant)
    return web.json_response(result)


async def dfns_request(request: web.Request) -> web.Response:
    method, path, payload, credential, grant = await _flow_call(request)
    up = await _flow(request).request(method, path, payload, credential, caller=_caller(request), grant=grant)
    return web.Response(status=up.status, body=up.content, headers={**up.headers, UPSTREAM_HEADER: "dfns"})


async def register_credential(request: web.Request) -> web.Response:
    body = await _json_object(request)
    _check_fields(body, {"credential"}, {"via", "credentialName"})
    credential = _required_str(body, "credential")
    via = _optional_str(body, "via")
    request["audit"] = {"credential": credential}
    grant = request.app[STATE].policy.check(_caller(request), "register", credential=credential)
    if via is not None:
        grant.require_credential(via)
    result = await _flow(request).register_credential(
        credential, via, _optional_str(body, "credentialName"), caller=_caller(request), grant=grant
    )
    return web.json_response(result)


async def credentials(request: web.Request) -> web.Response:
    return web.json_response({"credentials": [c.describe() for c in request.app[STATE].service.credentials]})


async def health(request: web.Request) -> web.Response:
    result = await _in_pool(request, request.app[STATE].service.health)
    return web.json_response(result, status=200 if result["status"] == "ok" else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    registry = request.app[STATE].service.metrics
    if registry is None:
        raise web.HTTPNotFound()
    body, content_type = registry.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


ROUTES: list[tuple[str, str, Callable[[web.Request], Awaitable[web.Response]]]] = [
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


def create_app(state: AgentState, limits: Limits | None = None) -> web.Application:
    limits = limits or Limits()
    app = web.Application(client_max_size=limits.max_body, middlewares=[_errors, _identify])
    app[STATE] = state
    app[LIMITS] = limits
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)

    async def dfns_client(app: web.Application) -> Any:
        # The pooled HTTP client belongs to the server's event loop: made here, closed on shutdown.
        http = make_http_client()
        app[STATE].bind_http(http)
        yield
        await http.aclose()

    app.cleanup_ctx.append(dfns_client)
    return app


_BUSY = json.dumps({"error": {"code": "too_many_connections", "message": "the agent is at its connection limit"}})
_BUSY_RESPONSE = (
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    f"Content-Length: {len(_BUSY)}\r\n\r\n{_BUSY}"
).encode()


class _Busy(asyncio.Protocol):
    """Answers a connection over the limit with a fixed 503 and closes it, without reading the request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        cast(asyncio.Transport, transport).write(_BUSY_RESPONSE)
        transport.close()


class _BoundedSite(web.SockSite):
    """A SockSite that stops taking new connections into aiohttp beyond ``max_connections``."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, *, max_connections: int, **kw: Any) -> None:
        super().__init__(runner, sock, **kw)
        self._max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        limit = self._max_connections

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= limit:
                return _Busy()
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(factory, sock=self._sock)


async def serve(
    app: web.Application, sock: socket.socket, stop: asyncio.Event, *, shutdown_timeout: float = 10.0
) -> None:
    """Serve ``app`` on an already bound, listening socket until ``stop`` is set, then drain in-flight requests.

    ``idle_timeout`` doubles as the header timeout: aiohttp closes a connection that has not delivered a
    complete request within it (a slow or silent client), as well as one idle between requests.
    """
    limits = app[LIMITS]
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=limits.idle_timeout,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        site = _BoundedSite(runner, sock, max_connections=limits.max_connections)
        await site.start()
        await stop.wait()
    finally:
        await runner.cleanup()
