"""``agent/dev/modules.py`` looks for the PKCS#11 modules of the contract suite where this machine's
architecture has them (Debian's ``/usr/lib/<multiarch>/pkcs11/``), so an arm64 machine that installed them
runs the suite instead of skipping it as "not installed"."""

from __future__ import annotations

import importlib
import sysconfig
from typing import Any

import pytest

from agent.dev import modules


def test_module_paths_follow_the_machines_multiarch_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sysconfig.get_config_var

    def arm64(name: str) -> Any:
        return "aarch64-linux-gnu" if name == "MULTIARCH" else real(name)

    monkeypatch.setattr(sysconfig, "get_config_var", arm64)
    try:
        importlib.reload(modules)
        assert modules.P11KIT_CLIENT == "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so"
        assert modules.OPENCRYPTOKI == "/usr/lib/aarch64-linux-gnu/pkcs11/libopencryptoki.so"
        assert modules.TPM2_PKCS11 == "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
    finally:
        monkeypatch.undo()
        importlib.reload(modules)
    arch = sysconfig.get_config_var("MULTIARCH")
    if arch:
        assert modules.P11KIT_CLIENT == f"/usr/lib/{arch}/pkcs11/p11-kit-client.so"
