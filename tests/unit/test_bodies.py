"""Request bodies are read into typed values, and anything else is a clear 400 (never a 500)."""

from __future__ import annotations

import json

import pytest

from agent.app.bodies import RegisterCredentialBody, SignBody, dfns_call, json_object
from agent.errors import BadRequest


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than Python's json can recurse: RecursionError inside json
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"x": NaN}',  # Python's json takes NaN, JSON does not
        b'{"x": 1e400}',  # beyond a double: Python's json reads inf, which would be written back as Infinity
        b'{"x": [-1e999]}',
        b"\xff\xfe\x00",
        b"{",
    ],
)
def test_a_body_json_cannot_read_is_a_400_invalid_json(raw: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        json_object(raw)
    assert info.value.code == "invalid_json" and info.value.status == 400


def test_a_json_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(BadRequest, match="must be a JSON object"):
        json_object(b"[1, 2]")
    assert json_object(b'{"challenge": {"a": [1, {"b": null}]}}') == {"challenge": {"a": [1, {"b": None}]}}


@pytest.mark.parametrize("field", ["credential", "via"])
@pytest.mark.parametrize("name", ["x" * 30_000, "has space", "-leading-dash", "a/b", "é"])
def test_a_name_no_credential_can_have_is_refused_unread_and_not_echoed_at_length(field: str, name: str) -> None:
    """Config names are 1-64 letters, digits, '.', '_', '-'; anything else cannot name a credential, and a
    long one would otherwise be written into the audit log (twice per refusal record) and echoed back."""
    with pytest.raises(BadRequest, match=f"{field} must be a credential name") as info:
        RegisterCredentialBody.parse(json.dumps({"credential": "ok", field: name}).encode())
    assert info.value.code == "invalid_request" and len(info.value.message) < 200


def test_names_a_credential_can_have_pass() -> None:
    name = "A" + "b.c_d-" * 10 + "xyz"  # 64 characters
    assert RegisterCredentialBody.parse(json.dumps({"credential": name, "via": "ops.1"}).encode()).credential == name
    sign = {"challenge": {"challenge": "Y2g", "challengeIdentifier": "id"}, "credential": name}
    assert SignBody.parse(json.dumps(sign).encode()).credential == name


@pytest.mark.parametrize("method", ["X" * 60_000, "CONNECT", "TRACE", "GETT", "", 7, None])
def test_a_method_dfns_does_not_have_is_refused_unread_and_not_echoed(method: object) -> None:
    """Before the policy: a refusal quotes the method in its audit record and log line."""
    with pytest.raises(BadRequest, match="method must be one of DELETE, GET, PATCH, POST, PUT") as info:
        dfns_call(json.dumps({"method": method, "path": "/wallets"}).encode())
    assert info.value.status == 400 and len(info.value.message) < 200


def test_dfnss_methods_pass_in_either_case() -> None:
    for method in ("get", "Post", "PUT", "delete", "patch"):
        assert dfns_call(json.dumps({"method": method, "path": "/wallets"}).encode()).method == method.upper()
