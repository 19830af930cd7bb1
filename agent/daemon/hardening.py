"""Process hardening, as OpenSSH's agent does it: no core dumps, not dumpable (no ptrace by the same uid)."""

from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger(__name__)

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0))


def harden_process() -> None:
    """Keep the PIN, the bearer tokens and session state out of core files and away from debuggers."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _prctl(_PR_SET_DUMPABLE, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed; the process stays dumpable")


def is_dumpable() -> bool:
    return _prctl(_PR_GET_DUMPABLE) != 0
