"""The Dfns protocol as typed values (``dfns-protocol.md`` §2-§4): which bytes a Key credential signs and
what goes back to Dfns. Knows nothing of sockets, HTTP or tokens: it signs through any :class:`Signer`.

- ``agent/dfns/clientdata.py``: :class:`ClientData`, the exact bytes with their base64url and hash;
- ``agent/dfns/challenge.py``: the challenges Dfns hands out, checked on the way in;
- ``agent/dfns/assertion.py``: :class:`KeyAssertion` (``firstFactor``) and :class:`CredentialInfo` (registration);
- ``agent/dfns/verify.py``: signature verification as Dfns does it;
- ``agent/dfns/encoding.py``: base64url and digests.
"""

from agent.dfns.assertion import (
    CredentialInfo,
    KeyAssertion,
    Registration,
    Signer,
    cred_id_for_key,
    credential_fingerprint,
)
from agent.dfns.challenge import MAX_CHALLENGE_LEN, RegistrationChallenge, UserActionChallenge
from agent.dfns.clientdata import KEY_CREATE, KEY_GET, ClientData, ClientDataType, client_data
from agent.dfns.encoding import b64url, b64url_decode, sha256_hex
from agent.dfns.verify import PublicKey, load_public_key, verify_signature

__all__ = [
    "KEY_CREATE",
    "KEY_GET",
    "MAX_CHALLENGE_LEN",
    "ClientData",
    "ClientDataType",
    "CredentialInfo",
    "KeyAssertion",
    "PublicKey",
    "Registration",
    "RegistrationChallenge",
    "Signer",
    "UserActionChallenge",
    "b64url",
    "b64url_decode",
    "client_data",
    "cred_id_for_key",
    "credential_fingerprint",
    "load_public_key",
    "sha256_hex",
    "verify_signature",
]
