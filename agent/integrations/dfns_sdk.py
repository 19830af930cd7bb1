"""A signer for the official Dfns Python SDK (PyPI ``dfns-sdk``, module ``dfns_sdk``) backed by the agent.

The SDK makes every HTTP call to Dfns itself (``/auth/action/init``, ``/auth/action`` and the real call);
for the middle step it calls ``signer.sign(challenge)`` **synchronously** with the ``/auth/action/init``
answer as a plain ``dict`` (typed ``dfns_sdk.auth.UserActionChallenge``, a ``TypedDict``), and sends what
it gets back, unchanged, as ``firstFactor`` (typed ``dfns_sdk.auth.CredentialAssertion``, also a
``TypedDict``: ``{"kind": "Key", "credentialAssertion": {"credId", "clientData", "signature"}}``).
:class:`AgentSigner` forwards that challenge to the agent's ``POST /v1/sign``, which signs on the HSM and
answers exactly that object. The private key never leaves the token; the Dfns token stays with the SDK.

Usage::

    from dfns_sdk import DfnsClient, DfnsClientConfig
    from agent.integrations.dfns_sdk import AgentSigner

    with AgentSigner(credential="treasury") as signer:        # default socket, as ``dfns-agent serve``
        client = DfnsClient(DfnsClientConfig(auth_token=token, signer=signer))
        wallet = client.wallets.create_wallet({"network": "EthereumSepolia"})

Agent errors (refusals such as ``credential_not_allowed``, an unreachable socket) are raised from
``sign`` as :class:`agent.client.AgentClientError`, whose ``code`` is the agent's stable error code; the
SDK does not catch them, so they come out of the SDK call that needed the signature.

This module does not import ``dfns_sdk``: it satisfies ``dfns_sdk.auth.Signer`` structurally. The
SDK's ``AsyncHttpClient`` also calls ``sign`` synchronously, so with the async client the event loop
waits for the HSM (typically milliseconds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from agent.client import AgentClient, AgentClientError

__all__ = ["AgentClientError", "AgentSigner", "CredentialAssertion"]

_ASSERTION_FIELDS = ("credId", "clientData", "signature")


class CredentialAssertion(TypedDict):
    """Same shape as ``dfns_sdk.auth.CredentialAssertion`` (TypedDicts are structural), so mypy accepts
    :class:`AgentSigner` wherever the SDK wants a ``Signer``."""

    kind: str
    credentialAssertion: dict[str, str]


class AgentSigner:
    """``dfns_sdk.auth.Signer`` that has the dfns-agent sign user-action challenges on its token.

    ``socket_path``: the agent's Unix socket (default: the agent's default socket path).
    ``credential``: the agent credential to sign with (default: the first of the agent's credentials that
    the challenge allows). ``timeout``: seconds per request to the agent.
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        credential: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.credential = credential
        self._client = AgentClient(socket_path, timeout=timeout)

    @property
    def socket_path(self) -> Path:
        return self._client.socket_path

    def sign(self, challenge: Mapping[str, Any]) -> CredentialAssertion:
        """Sign an ``/auth/action/init`` answer; returns the ``firstFactor`` for ``POST /auth/action``.

        Raises :class:`AgentClientError` when the agent refuses, fails or cannot be reached.
        """
        first_factor = self._client.sign(_as_json_object(challenge), self.credential)
        return _credential_assertion(first_factor)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AgentSigner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AgentSigner(socket_path={str(self.socket_path)!r}, credential={self.credential!r})"


def _as_json_object(challenge: object) -> dict[str, Any]:
    """The challenge as a JSON-ready dict.

    dfns-sdk 1.0.x passes the parsed JSON answer (a dict); objects (pydantic models, dataclasses), which
    other SDK versions might pass, are converted too.
    """
    if isinstance(challenge, Mapping):
        return dict(challenge)
    model_dump = getattr(challenge, "model_dump", None)
    if callable(model_dump):
        dumped = model_dump(mode="json", by_alias=True, exclude_none=True)
        if isinstance(dumped, dict):
            return dumped
    if dataclasses.is_dataclass(challenge) and not isinstance(challenge, type):
        return dataclasses.asdict(challenge)
    raise TypeError(f"AgentSigner.sign expects the /auth/action/init answer as a mapping, not {type(challenge)!r}")


def _credential_assertion(first_factor: Mapping[str, Any]) -> CredentialAssertion:
    """Check the agent's answer has the shape Dfns expects and return it as the SDK's assertion."""
    assertion = first_factor.get("credentialAssertion")
    if (
        first_factor.get("kind") != "Key"
        or not isinstance(assertion, Mapping)
        or not all(isinstance(assertion.get(k), str) for k in _ASSERTION_FIELDS)
    ):
        raise AgentClientError(200, "bad_response", "the agent's /v1/sign answer is not a Key credential assertion")
    return {"kind": "Key", "credentialAssertion": {k: str(v) for k, v in assertion.items() if isinstance(v, str)}}
