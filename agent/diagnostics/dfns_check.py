"""Check 7: each Dfns API the config names answers over HTTP from here (no token is sent)."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from agent.diagnostics.results import Check, failed, passed

TIMEOUT = 5.0  # seconds per URL: a dead host costs this once per distinct URL


def dfns_http_client() -> httpx.Client:
    """One client for every URL: no redirects followed, and the agent's own User-Agent."""
    from agent.dfnsapi.client import USER_AGENT

    return httpx.Client(timeout=TIMEOUT, follow_redirects=False, headers={"User-Agent": USER_AGENT})


def check_dfns_url(http: httpx.Client, cred_name: str, url: str) -> Check:
    """Any HTTP answer proves DNS, routing, proxy and TLS work."""
    name = f"dfns {cred_name}"
    try:
        r = http.get(url)
    except httpx.TimeoutException:
        problem = f"{url} did not answer within {TIMEOUT:g} s"
    except httpx.HTTPError as e:
        problem = f"cannot reach {url}: {type(e).__name__}: {e}"
    else:
        return passed(name, f"{url} answered HTTP {r.status_code} (reachable)")
    return failed(
        name,
        problem,
        f"check DNS (getent hosts {urlsplit(url).hostname}) and the route from this machine; behind a proxy set "
        "HTTPS_PROXY (and NO_PROXY for local hosts) in the agent's environment; for TLS errors behind an "
        "inspecting proxy point SSL_CERT_FILE at its CA bundle; under systemd the unit's RestrictAddressFamilies= "
        "must include AF_INET and AF_INET6 (and IPAddressDeny= must not block the host)",
    )
