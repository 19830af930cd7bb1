"""Check 7: each Dfns API the config names answers over HTTP from here and, when the credential's bearer
token could be read, accepts it.

With a token the check makes one authenticated, read-only call, ``GET /auth/credentials`` (it lists the
caller's credentials and changes nothing); the token goes only into that request's ``Authorization``
header, never into a result. Without one it sends a plain ``GET`` of the base URL, which proves only that
the host answers.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import httpx

from agent.diagnostics.results import Check, failed, passed
from agent.secret import Secret

TIMEOUT = 5.0  # seconds per URL: a dead host costs this once per distinct URL
AUTH_PATH = "/auth/credentials"  # authenticated, read-only, cheap: the caller's own credentials
DEV_DFNS_URL = "http://127.0.0.1:8400"  # where ./softhsm_setup.sh dev-dfns serves


def dfns_http_client() -> httpx.Client:
    """One client for every URL: no redirects followed, and the agent's own User-Agent."""
    from agent.dfnsapi.client import USER_AGENT

    return httpx.Client(timeout=TIMEOUT, follow_redirects=False, headers={"User-Agent": USER_AGENT})


def check_dfns_url(http: httpx.Client, cred_name: str, url: str, token: Secret | None = None) -> Check:
    """Any HTTP answer proves DNS, routing, proxy and TLS work; with ``token``, a 401/403 to an
    authenticated read shows the token is rejected, which is a failure."""
    name = f"dfns {cred_name}"
    target = url if token is None else url + AUTH_PATH
    try:
        if token is None:
            r = http.get(target)
        else:
            r = http.get(target, headers={"Authorization": f"Bearer {token.reveal()}"})
    except httpx.TimeoutException:
        problem = f"{url} did not answer within {TIMEOUT:g} s"
    except httpx.HTTPError as e:
        problem = f"cannot reach {url}: {type(e).__name__}: {e}"
        if _refused(e) and _is_loopback(url):
            return failed(name, problem, _nothing_listening_fix(url))
    else:
        if token is None:
            return passed(name, f"{url} answered HTTP {r.status_code} (reachable; token not checked)")
        return _token_answer(name, url, token, r)
    return failed(
        name,
        problem,
        f"check DNS (getent hosts {urlsplit(url).hostname}) and the route from this machine; behind a proxy set "
        "HTTPS_PROXY (and NO_PROXY for local hosts) in the agent's environment; for TLS errors behind an "
        "inspecting proxy point SSL_CERT_FILE at its CA bundle; under systemd the unit's RestrictAddressFamilies= "
        "must include AF_INET and AF_INET6 (and IPAddressDeny= must not block the host)",
    )


def _token_answer(name: str, url: str, token: Secret, r: httpx.Response) -> Check:
    said = _dfns_message(r)
    if r.status_code == 401:
        return failed(
            name,
            f"{url} is reachable but rejected the token: GET {AUTH_PATH} answered HTTP 401{said}",
            f"the token from {token.source} is wrong or expired, or its service account is deactivated: put a "
            "valid service-account token there; also check that base_url is the organisation's Dfns region",
        )
    if r.status_code == 403:
        return failed(
            name,
            f"{url} is reachable but refused the token: GET {AUTH_PATH} answered HTTP 403{said}",
            f"the token from {token.source} is accepted but not allowed to read {AUTH_PATH}: give its service "
            "account that permission, or use a token that has it",
        )
    if r.is_success:
        return passed(name, f"{url} is reachable and accepts the token (GET {AUTH_PATH} answered {r.status_code})")
    return passed(
        name,
        f"{url} answered HTTP {r.status_code} (reachable)",
        f"the token could not be checked: GET {AUTH_PATH} answered HTTP {r.status_code}{said}",
    )


def _dfns_message(r: httpx.Response) -> str:
    """``: message`` from Dfns's error envelope, if there is one."""
    try:
        error = r.json().get("error")
    except (ValueError, AttributeError):
        return ""
    message = error.get("message") if isinstance(error, dict) else None
    return f": {message}" if isinstance(message, str) and message else ""


def _refused(e: BaseException) -> bool:
    """Whether the connection was refused (nothing listens there), looking through httpx's wrapping."""
    seen: BaseException | None = e
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(e, httpx.ConnectError) and ("Errno 111" in str(e) or "Connection refused" in str(e))


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _nothing_listening_fix(url: str) -> str:
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    start = "start the server base_url names"
    if url.rstrip("/") == DEV_DFNS_URL:
        start = "start the local Dfns-compatible API: ./softhsm_setup.sh dev-dfns"
    else:
        start += f" (for the dev server: ./softhsm_setup.sh dev-dfns, which serves {DEV_DFNS_URL})"
    return f"nothing is listening on {where}: {start}, or point base_url at the Dfns API (https://api.dfns.io)"
