"""HTTP/1.1 + JSON over the Unix socket, served by aiohttp.

Handlers only parse and validate requests; the work happens in :class:`agent.service.SigningService` on a
thread pool, because PKCS#11 calls block (python-pkcs11 releases the GIL during them). Every failure
leaves as ``{"error": {"code", "message"}}`` with the status its :class:`agent.errors.AgentError` names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

from aiohttp import web

from agent import openapi
from agent.config import DfnsConfig
from agent.dfns_client import DfnsApi, make_http_client
from agent.errors import AgentError, BadRequest, PayloadTooLarge
from agent.flow import DfnsFlow
from agent.secret import Secret
from agent.service import SigningService

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE: web.AppKey[SigningService] = web.AppKey("service", SigningService)
EXECUTOR: web.AppKey[Executor] = web.AppKey("executor", Executor)
MAX_BODY: web.AppKey[int] = web.AppKey("max_body", int)
FLOW: web.AppKey[DfnsFlow] = web.AppKey("flow", DfnsFlow)
UPSTREAM_HEADER = "X-Dfns-Agent-Upstream"

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except AgentError as e:
        if e.status >= 500:
            log.warning("%s %s failed: %s", request.method, request.path, e.message)
        return web.json_response(e.to_json(), status=e.status)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY]
        e2 = PayloadTooLarge(f"request body is larger than {limit} bytes")
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


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
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


async def _in_pool(request: web.Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[EXECUTOR], lambda: fn(*args, **kwargs))


async def sign(request: web.Request) -> web.Response:
    body = await _json_object(request)
    _check_fields(body, {"challenge"}, {"credential"})
    credential = _optional_str(body, "credential")
    result = await _in_pool(request, request.app[SERVICE].sign, body["challenge"], credential)
    return web.json_response(result)


async def register(request: web.Request) -> web.Response:
    body = await _json_object(request)
    _check_fields(body, {"challenge", "credential"}, {"credId", "credentialName"})
    credential = _optional_str(body, "credential")
    assert credential is not None  # required above; _optional_str rejected null and ""
    result = await _in_pool(
        request,
        request.app[SERVICE].register,
        body["challenge"],
        credential,
        cred_id=_optional_str(body, "credId"),
        credential_name=_optional_str(body, "credentialName"),
    )
    return web.json_response(result)


def _flow_input(body: Mapping[str, Any]) -> tuple[str, str, Any, str | None]:
    _check_fields(body, {"method", "path"}, {"body", "credential"})
    method, path = body["method"], body["path"]
    if not isinstance(method, str) or not method.isalpha():
        raise BadRequest("method must be an HTTP method name such as POST")
    if not isinstance(path, str):
        raise BadRequest("path must be a string")
    return method, path, body.get("body"), _optional_str(body, "credential")


async def user_action(request: web.Request) -> web.Response:
    method, path, payload, credential = _flow_input(await _json_object(request))
    return web.json_response(await request.app[FLOW].user_action(method, path, payload, credential))


async def dfns_request(request: web.Request) -> web.Response:
    method, path, payload, credential = _flow_input(await _json_object(request))
    up = await request.app[FLOW].request(method, path, payload, credential)
    return web.Response(status=up.status, body=up.content, headers={**up.headers, UPSTREAM_HEADER: "dfns"})


async def register_credential(request: web.Request) -> web.Response:
    body = await _json_object(request)
    _check_fields(body, {"credential"}, {"via", "credentialName"})
    credential = _optional_str(body, "credential")
    assert credential is not None
    result = await request.app[FLOW].register_credential(
        credential, _optional_str(body, "via"), _optional_str(body, "credentialName")
    )
    return web.json_response(result)


async def credentials(request: web.Request) -> web.Response:
    return web.json_response({"credentials": [c.describe() for c in request.app[SERVICE].credentials]})


async def health(request: web.Request) -> web.Response:
    result = await _in_pool(request, request.app[SERVICE].health)
    return web.json_response(result, status=200 if result["status"] == "ok" else 503)


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
    ("GET", "/v1/openapi.json", openapi_document),
]


def create_app(
    service: SigningService,
    executor: Executor,
    *,
    max_body: int,
    dfns: Mapping[str, tuple[DfnsConfig, Secret]] | None = None,
) -> web.Application:
    """The agent's app. ``dfns`` maps credential names to their Dfns settings and bearer token."""
    app = web.Application(client_max_size=max_body, middlewares=[_errors])
    app[SERVICE] = service
    app[EXECUTOR] = executor
    app[MAX_BODY] = max_body
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)

    async def dfns_client(app: web.Application) -> Any:
        # The pooled HTTP client belongs to the server's event loop: made here, closed on shutdown.
        http = make_http_client()
        apis = {name: DfnsApi(http, cfg, token) for name, (cfg, token) in (dfns or {}).items()}
        app[FLOW] = DfnsFlow(service, executor, apis)
        yield
        await http.aclose()

    app.cleanup_ctx.append(dfns_client)
    return app


async def serve(
    app: web.Application, sock: socket.socket, stop: asyncio.Event, *, shutdown_timeout: float = 10.0
) -> None:
    """Serve ``app`` on an already bound, listening socket until ``stop`` is set, then drain."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, shutdown_timeout=shutdown_timeout).start()
        await stop.wait()
    finally:
        await runner.cleanup()
