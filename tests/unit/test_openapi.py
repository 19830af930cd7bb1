"""The OpenAPI document matches the routes the server registers and the bodies it sends."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from agent.app import openapi
from agent.app.routes import ROUTES


def validate(instance: Any, schema_name: str) -> None:
    doc = openapi.document()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_every_route_is_documented_and_every_documented_path_is_served() -> None:
    documented = {(m.upper(), p) for p, ops in openapi.document()["paths"].items() for m in ops}
    served = {(m, p) for m, p, _ in ROUTES}
    assert documented == served


def test_the_schemas_are_valid_json_schema() -> None:
    for schema in openapi.SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_schemas_reject_what_the_server_rejects() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate({"challenge": {"challenge": "Y2g"}, "extra": 1}, "SignRequest")
    with pytest.raises(jsonschema.ValidationError):
        validate({"challenge": {"challenge": "not base64!"}}, "SignRequest")
