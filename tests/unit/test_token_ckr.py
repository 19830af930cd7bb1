"""PKCS#11 errors are named: every CKR_* in a message has its name, python-pkcs11's empty ones too."""

from __future__ import annotations

from pkcs11 import exceptions as p11

from agent.token.ckr import ckr_name
from agent.token.module import describe


def test_codes_have_their_names() -> None:
    assert ckr_name(0x140) == "CKR_CURVE_NOT_SUPPORTED (0x140)"
    assert ckr_name(0x190) == "CKR_CRYPTOKI_NOT_INITIALIZED (0x190)"
    assert ckr_name(0x80000001) == "CKR_VENDOR_DEFINED+0x1"
    assert ckr_name(0x7777) == "CKR 0x7777 (unknown)"


def test_python_pkcs11_errors_are_described_with_their_ckr_name() -> None:
    assert describe(p11.MechanismInvalid()) == "MechanismInvalid (CKR_MECHANISM_INVALID)"
    assert describe(p11.PKCS11Error("Unmapped error code 0x140")) == "CKR_CURVE_NOT_SUPPORTED (0x140)"
    assert describe(p11.DeviceError("boom")) == "DeviceError (CKR_DEVICE_ERROR): boom"
