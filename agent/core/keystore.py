"""What the signing service needs of a token, as a protocol.

:class:`agent.token.Token` is the real one; the unit tests plug in a software key store, so the service,
the flow and the routes are tested in-process in milliseconds beside the SoftHSM end-to-end tests.
"""

from __future__ import annotations

from typing import Protocol

from agent.health import TokenHealth, TokenIdentity
from agent.token.keys import KeyInfo


class KeyStore(Protocol):
    """Keys that sign on a device (or, in tests, in software), with the device's health."""

    @property
    def identity(self) -> TokenIdentity: ...

    @property
    def name(self) -> str: ...

    def find_key(self, label: str, key_id: bytes | None = None) -> KeyInfo: ...

    def sign(self, key: KeyInfo, message: bytes) -> bytes: ...

    def health(self) -> TokenHealth: ...

    def fault(self, reason: str) -> None:
        """Open the circuit: the device did not answer in time (recovery takes it from there)."""
