"""Request bodies are read into typed values, and anything else is a clear 400 (never a 500)."""

from __future__ import annotations

import pytest

from agent.app.bodies import json_object
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
