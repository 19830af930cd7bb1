"""The OpenAPI 3.1 description of the agent's HTTP API (served at ``GET /v1/openapi.json``).

Kept next to the code and checked by the tests: every route the server registers is described here and
every response the tests see validates against the schema named for it.
"""

from __future__ import annotations

from typing import Any

from agent import __version__
from agent.config import CREDENTIAL_NAME_PATTERN


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_B64URL = {"type": "string", "pattern": "^[A-Za-z0-9_-]+={0,2}$"}
# A path character, or a percent escape of anything but '.', '/', '\\' and NUL (agent.dfnsapi.flow.check_path).
_PCHAR = r"(?:[A-Za-z0-9_~!$&'()*+,;=:@-]|%(?:0[1-9A-Fa-f]|[13-46-9A-Fa-f][0-9A-Fa-f]|2[0-9A-Da-d]|5[0-9ABD-Fabd-f]))"
_SEGMENT = rf"(?:{_PCHAR}(?:{_PCHAR}|\.)*|\.{_PCHAR}(?:{_PCHAR}|\.)*|\.\.(?:{_PCHAR}|\.)+)"  # not empty, . or ..
_DFNS_PATH = rf"^(?:/{_SEGMENT})+(?:\?(?:{_PCHAR}|[./?])*)?$"

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "description": "stable, machine-readable"},
                    "message": {"type": "string", "description": "for humans"},
                    "dfns": {"type": "object", "description": "Dfns's own error object, when Dfns refused a step"},
                },
            }
        },
    },
    "UserActionChallenge": {
        "type": "object",
        "description": "The body of Dfns's POST /auth/action/init answer, passed through unchanged.",
        "required": ["challenge", "allowCredentials"],
        "properties": {
            "challenge": {**_B64URL, "maxLength": 1024},
            "challengeIdentifier": {"type": "string"},
            "allowCredentials": {
                "type": "object",
                "required": ["key"],
                "properties": {
                    "key": {
                        "type": "array",
                        "items": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
                    }
                },
            },
        },
    },
    "RegistrationChallenge": {
        "type": "object",
        "description": "The body of Dfns's POST /auth/credentials/init answer (kind Key).",
        "required": ["challenge"],
        "properties": {
            "kind": {"const": "Key"},
            "challenge": {**_B64URL, "maxLength": 1024},
            "challengeIdentifier": {"type": "string"},
        },
    },
    "SignRequest": {
        "type": "object",
        "required": ["challenge"],
        "additionalProperties": False,
        "properties": {
            "challenge": _ref("UserActionChallenge"),
            "credential": {
                "type": "string",
                "pattern": CREDENTIAL_NAME_PATTERN,
                "description": "configured credential name; default: the first one the challenge allows",
            },
        },
    },
    "FirstFactor": {
        "type": "object",
        "description": "firstFactor for POST /auth/action.",
        "required": ["kind", "credentialAssertion"],
        "additionalProperties": False,
        "properties": {
            "kind": {"const": "Key"},
            "credentialAssertion": {
                "type": "object",
                "required": ["credId", "clientData", "signature"],
                "additionalProperties": False,
                "properties": {"credId": {"type": "string"}, "clientData": _B64URL, "signature": _B64URL},
            },
        },
    },
    "RegisterRequest": {
        "type": "object",
        "required": ["challenge", "credential"],
        "additionalProperties": False,
        "properties": {
            "challenge": _ref("RegistrationChallenge"),
            "credential": {
                "type": "string",
                "pattern": CREDENTIAL_NAME_PATTERN,
                "description": "configured credential whose key to register",
            },
            "credId": {"type": "string", "minLength": 1, "description": "default: the credential's credId"},
            "credentialName": {"type": "string", "minLength": 1, "description": "default: the credential's name"},
        },
    },
    "RegisterResponse": {
        "type": "object",
        "description": "Body for POST /auth/credentials (sent with a user action from an existing credential).",
        "required": ["credentialKind", "credentialInfo", "credentialName"],
        "additionalProperties": False,
        "properties": {
            "credentialKind": {"const": "Key"},
            "credentialName": {"type": "string"},
            "challengeIdentifier": {"type": "string"},
            "credentialInfo": {
                "type": "object",
                "required": ["credId", "clientData", "attestationData"],
                "additionalProperties": False,
                "properties": {"credId": {"type": "string"}, "clientData": _B64URL, "attestationData": _B64URL},
            },
        },
    },
    "DfnsCall": {
        "type": "object",
        "description": "A Dfns API call for the agent to authorize (and, for /v1/request, make).",
        "required": ["method", "path"],
        "additionalProperties": False,
        "properties": {
            "method": {
                "enum": ["GET", "POST", "PUT", "DELETE", "PATCH"],
                "description": "POST, PUT, DELETE, PATCH (GET: /v1/request only, else 400)",
            },
            "path": {
                "type": "string",
                "pattern": _DFNS_PATH,
                "maxLength": 2048,
                "description": "e.g. /wallets; query allowed; no empty, '.' or '..' segment and no encoded '.', "
                "'/', '\\' or NUL (else 400 invalid_path)",
            },
            "body": {"description": "JSON body; serialized once, compactly; omitted or null means {}"},
            "credential": {
                "type": "string",
                "pattern": CREDENTIAL_NAME_PATTERN,
                "description": "default: the first with Dfns settings",
            },
        },
    },
    "UserAction": {
        "type": "object",
        "required": ["userAction", "payload"],
        "additionalProperties": False,
        "properties": {
            "userAction": {"type": "string", "description": "send as X-DFNS-USERACTION; single use"},
            "payload": {"type": "string", "description": "send exactly these bytes as the request body"},
        },
    },
    "RegisterCredentialRequest": {
        "type": "object",
        "required": ["credential"],
        "additionalProperties": False,
        "properties": {
            "credential": {
                "type": "string",
                "pattern": CREDENTIAL_NAME_PATTERN,
                "description": "credential whose key to register",
            },
            "via": {
                "type": "string",
                "pattern": CREDENTIAL_NAME_PATTERN,
                "description": "existing credential that signs the user action",
            },
            "credentialName": {"type": "string", "minLength": 1},
        },
    },
    "Credential": {
        "type": "object",
        "required": ["name", "credId", "keyLabel", "keyId", "keyType", "fingerprint", "publicKey", "origin"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "credId": {"type": "string"},
            "keyLabel": {"type": "string"},
            "keyId": {"type": "string", "description": "CKA_ID, hex"},
            "keyType": {"enum": ["ed25519", "p256", "secp256k1", "rsa2048", "rsa3072"]},
            "fingerprint": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
            "publicKey": {"type": "string", "description": "SubjectPublicKeyInfo PEM"},
            "origin": {"type": ["string", "null"]},
        },
    },
    "Credentials": {
        "type": "object",
        "required": ["credentials"],
        "additionalProperties": False,
        "properties": {"credentials": {"type": "array", "items": _ref("Credential")}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "token", "keys", "uptimeSeconds"],
        "additionalProperties": False,
        "properties": {
            "status": {
                "enum": ["ok", "degraded", "down"],
                "description": "degraded: the token failed and the agent is reconnecting by itself; down: it needs "
                "an operator (PIN rejected or locked, a different token, the audit log unwritable)",
            },
            "reason": {"type": "string"},
            "uptimeSeconds": {"type": "number"},
            "token": {
                "type": "object",
                "required": ["label", "serial", "manufacturer", "model", "present", "loggedIn", "reconnects"],
                "additionalProperties": False,
                "properties": {
                    "label": {"type": "string"},
                    "serial": {"type": "string"},
                    "manufacturer": {"type": "string"},
                    "model": {"type": "string"},
                    "present": {"type": "boolean"},
                    "loggedIn": {"type": "boolean"},
                    "reconnects": {"type": "integer", "minimum": 0},
                },
            },
            "keys": {"type": "object", "additionalProperties": {"type": "boolean"}},
        },
    },
}


# /v1/user-action: the same call, but only methods that need a user action (GET there is 400).
SCHEMAS["UserActionCall"] = {
    **SCHEMAS["DfnsCall"],
    "description": "A mutating Dfns API call for the agent to get a user action for.",
    "properties": {
        **SCHEMAS["DfnsCall"]["properties"],
        "method": {"enum": ["POST", "PUT", "DELETE", "PATCH"], "description": "a method that needs a user action"},
    },
}


def document() -> dict[str, Any]:
    common = {
        "400": _error("malformed request (codes invalid_json, invalid_request, invalid_challenge, invalid_path)"),
        "413": _error("request body too large (payload_too_large)"),
        "431": _error("request line and headers over 64 KiB (headers_too_large)"),
        "403": _error(
            "the policy refuses this caller or request (forbidden; the message names the rule), or bytes came from "
            "another process than the one that connected (sender_changed)"
        ),
        "405": _error("method not allowed on this path (method_not_allowed); the Allow header lists those that are"),
        "408": _error("request body not received in time (request_timeout)"),
        "429": _error("a policy rule's rate limit (rate_limited)"),
        "503": _error("token_unavailable, audit_unavailable"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dfns-agent",
            "version": __version__,
            "description": "Signs Dfns user-action and registration challenges with keys on a PKCS#11 token. "
            "Served over a Unix socket (e.g. curl --unix-socket PATH http://agent/v1/health).",
        },
        "paths": {
            "/v1/sign": {
                "post": {
                    "operationId": "sign",
                    "summary": "Sign an /auth/action/init challenge; returns firstFactor for POST /auth/action.",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("SignRequest")}}},
                    "responses": {
                        "200": _json(_ref("FirstFactor"), "the signed assertion"),
                        **common,
                        "404": _error("no credential with that name (unknown_credential)"),
                        "422": _error("credential not in allowCredentials.key (credential_not_allowed)"),
                    },
                }
            },
            "/v1/register": {
                "post": {
                    "operationId": "register",
                    "summary": "Sign an /auth/credentials/init challenge with a credential's key (new credential).",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("RegisterRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("RegisterResponse"), "body for POST /auth/credentials"),
                        **common,
                        "404": _error("no credential with that name (unknown_credential)"),
                    },
                }
            },
            "/v1/credentials": {
                "get": {
                    "operationId": "credentials",
                    "summary": "The configured credentials and their public keys.",
                    "responses": {"200": _json(_ref("Credentials"), "configured credentials")},
                },
                "post": {
                    "operationId": "registerCredential",
                    "summary": "Register a credential's key with Dfns (rotation), signed by an existing credential.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("RegisterCredentialRequest")}},
                    },
                    "responses": {
                        "200": {
                            "description": "Dfns's POST /auth/credentials answer",
                            "content": {"application/json": {}},
                        },
                        "202": {
                            "description": "Dfns's POST /auth/credentials answer, with Dfns's 202 (e.g. pending)",
                            "content": {"application/json": {}},
                        },
                        **common,
                        "404": _error("no credential with that name (unknown_credential)"),
                        "422": _error("dfns_not_configured"),
                        "default": _error("Dfns refused a step (dfns_error, with Dfns's status and error object)"),
                    },
                },
            },
            "/v1/user-action": {
                "post": {
                    "operationId": "userAction",
                    "summary": "Run /auth/action/init, sign on the token, /auth/action; return the user action.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("UserActionCall")}},
                    },
                    "responses": {
                        "200": _json(_ref("UserAction"), "user action and the exact payload to send"),
                        **common,
                        "404": _error("no credential with that name (unknown_credential)"),
                        "422": _error("credential_not_allowed, dfns_not_configured"),
                        "502": _error("Dfns unreachable (dfns_unreachable) or a Dfns 5xx (dfns_error)"),
                        "504": _error("Dfns did not answer in time (dfns_timeout)"),
                        "default": _error("Dfns refused a step (dfns_error, with Dfns's status and error object)"),
                    },
                }
            },
            "/v1/request": {
                "post": {
                    "operationId": "request",
                    "summary": "Make the Dfns call (with a user action when it mutates) and return Dfns's answer.",
                    "description": "Dfns's status and body come back unchanged (a 202 policy-pending answer "
                    "included), marked by the header X-Dfns-Agent-Upstream: dfns. Answers without that header "
                    "are the agent's own errors.",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("DfnsCall")}}},
                    "responses": {
                        "default": {"description": "Dfns's answer (X-Dfns-Agent-Upstream: dfns) or an agent Error"},
                    },
                }
            },
            "/v1/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Token reachable, logged in, and every credential's key present.",
                    "responses": {
                        "200": _json(_ref("Health"), "healthy"),
                        "503": _json(_ref("Health"), "not healthy; reason says why"),
                    },
                }
            },
            "/v1/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics of all worker processes: signatures by credential, key type and "
                    "outcome; latency histogram; token reconnects and state; refusals by rule; requests.",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {"200": {"description": "OpenAPI 3.1 document", "content": {"application/json": {}}}},
                }
            },
        },
        "components": {"schemas": SCHEMAS},
    }
