"""Dfns paths: one checked value for the policy and for Dfns; rule globs by segment (issue 13)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.app.bodies import dfns_call
from agent.caller import Caller
from agent.config import Rule
from agent.core.policy import Endpoint, Policy, path_matches
from agent.dfnsapi.flow import check_path
from agent.errors import BadRequest, Forbidden

NOBODY = Caller(65534, 65534, 1, None)


@pytest.mark.parametrize(
    "path",
    [
        "/wallets/x/..",
        "/wallets/../auth/credentials",
        "/wallets/./x",
        "/wallets/%2e%2e/auth",
        "/wallets/%2E%2e",
        "/wallets/a%2fb/transfers",
        "/wallets/a%2Fb",
        "/wallets/a%5cb",
        "/wallets/a%00",
        "/wallets/%zz",
        "/wallets/%4",
        "/wallets//transfers",
        "//evil.example/wallets",
        "/wallets/",
        "/",
        "/wallets?x=%2e%2e",
    ],
)
def test_tricky_paths_are_400_invalid_path_before_the_policy(path: str) -> None:
    with pytest.raises(BadRequest) as e:
        check_path(path)
    assert e.value.code == "invalid_path" and e.value.status == 400
    body = json.dumps({"method": "POST", "path": path}).encode()
    with pytest.raises(BadRequest) as e:
        dfns_call(body)  # where the routes read it: the policy never sees such a path
    assert e.value.code == "invalid_path"


@pytest.mark.parametrize(
    "path", ["/wallets", "/wallets/wa-1/transfers", "/wallets/wa-1/transfers?limit=2&x=a.b", "/a/%41b", "/x/a..b/.c"]
)
def test_plain_paths_pass_unchanged(path: str) -> None:
    assert check_path(path) == path
    assert dfns_call(json.dumps({"method": "GET", "path": path}).encode()).path == path


_SEGMENT = st.text(alphabet="abcXYZ019-._~!$&'()*+,;=:@", min_size=1, max_size=8)
_ESCAPE = st.sampled_from(["%41", "%20", "%7E", "%2e", "%2F", "%"])


@given(st.lists(st.one_of(_SEGMENT, st.tuples(_SEGMENT, _ESCAPE).map("".join)), min_size=1, max_size=6))
def test_what_is_checked_is_what_goes_upstream(segments: list[str]) -> None:
    """For every path the check accepts, the HTTP client sends exactly those bytes: nothing to re-normalise."""
    path = "/" + "/".join(segments)
    try:
        checked = check_path(path)
    except BadRequest:
        return
    assert checked == path
    assert httpx.URL("https://api.dfns.test" + checked).raw_path == checked.encode()


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/wallets/*/transfers", "/wallets/wa-1/transfers", True),
        ("/wallets/*/transfers", "/wallets/x/y/transfers", False),
        ("/wallets/*", "/wallets/x/y", False),
        ("/wallets/*", "/wallets", False),
        ("/wallets/**", "/wallets/x/y", True),
        ("/wallets/**", "/wallets", False),
        ("/wallets/**/transfers", "/wallets/x/y/transfers", True),
        ("/wallets/**/transfers", "/wallets/x/transfers", True),
        ("/wallets/wa-?", "/wallets/wa-1", True),
        ("/wallets/wa-?", "/wallets/wa-/", False),
        ("/wallets/[ab]", "/wallets/a", False),  # no shell classes: literal
        ("/wallets/[ab]", "/wallets/[ab]", True),
    ],
)
def test_a_star_is_one_segment_and_two_stars_are_several(pattern: str, path: str, matches: bool) -> None:
    assert path_matches(pattern, path) is matches


def test_the_policy_uses_segment_globs() -> None:
    policy = Policy([Rule("payments", uids=frozenset({65534}), paths=("/wallets/*/transfers",))])
    grant = policy.check(NOBODY, Endpoint.DFNS, method="POST", path="/wallets/wa-1/transfers?x=1")
    assert grant.rule == "payments"
    with pytest.raises(Forbidden, match="does not allow path /wallets/x/y/transfers"):
        policy.check(NOBODY, Endpoint.DFNS, method="POST", path="/wallets/x/y/transfers")
