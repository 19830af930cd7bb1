"""The OpenAPI document is what a running agent serves, and its real answers match their schemas."""

from __future__ import annotations

import jsonschema

from agent.app import openapi
from agent.dev.testing import AgentProcess, cred_id_for, make_challenge


def validate(instance: object, schema_name: str) -> None:
    doc = openapi.document()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


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
