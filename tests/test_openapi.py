"""The OpenAPI document matches the routes the server registers and the bodies it sends."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from conftest import AgentProcess, cred_id_for, make_challenge

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


def test_served_document_is_the_module_document(agent: AgentProcess) -> None:
    r = agent.http.get("/v1/openapi.json")
    assert r.status_code == 200
    assert r.json() == openapi.document()


def test_real_responses_match_their_schemas(agent: AgentProcess) -> None:
    challenge = make_challenge(cred_id_for("ed25519"))
    sign_request = {"challenge": challenge, "credential": "ed25519"}
    validate(sign_request, "SignRequest")
    validate(agent.post("/v1/sign", sign_request).json(), "FirstFactor")

    reg_request = {
        "challenge": {"kind": "Key", "challenge": "Y2gtcmVn", "challengeIdentifier": "x"},
        "credential": "p256",
    }
    validate(reg_request, "RegisterRequest")
    validate(agent.post("/v1/register", reg_request).json(), "RegisterResponse")

    validate(agent.http.get("/v1/credentials").json(), "Credentials")
    validate(agent.http.get("/v1/health").json(), "Health")
    for bad in (agent.post("/v1/sign", {}), agent.http.get("/v1/none"), agent.post("/v1/sign", {"challenge": {}})):
        validate(bad.json(), "Error")


def test_schemas_reject_what_the_server_rejects() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate({"challenge": {"challenge": "Y2g"}, "extra": 1}, "SignRequest")
    with pytest.raises(jsonschema.ValidationError):
        validate({"challenge": {"challenge": "not base64!"}}, "SignRequest")
