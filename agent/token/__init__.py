"""The PKCS#11 layer: everything that talks to the token, and nothing above it.

- ``agent/token/module.py``: loading a module with OS locking, finding the token;
- ``agent/token/keys.py``: key kinds, templates, encodings, key lookup and the self-test;
- ``agent/token/gate.py``: the readers-writer gate between signatures and recovery;
- ``agent/token/recovery.py``: the circuit breaker and its background recovery;
- ``agent/token/device.py``: :class:`Token`, the logged-in token with its sessions, probe and health.
"""

from agent.token.device import Token
from agent.token.keys import KeyInfo, KeyKind
from agent.token.module import load_module, unload_module
from agent.token.recovery import TokenEvent

__all__ = ["KeyInfo", "KeyKind", "Token", "TokenEvent", "load_module", "unload_module"]
