"""``softhsm_setup.sh``'s dev token (``agent.dev.softhsm.setup_dev_token``) on a real SoftHSM: run again it
changes nothing, and a PIN file lost while the token stays does not leave the quick start failing for good."""

from __future__ import annotations

from pathlib import Path

from agent.dev.softhsm import DEV_KEY_LABEL, DEV_TOKEN_LABEL, generate_keys, require_module, setup_dev_token


def _public_keys(dev: Path) -> dict[str, str]:
    pin = (dev / "pin").read_text().splitlines()[0]
    return generate_keys(dev, module=require_module(), label=DEV_TOKEN_LABEL, pin=pin, keys={})


def test_run_again_it_keeps_the_pin_and_the_key(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    setup_dev_token(dev, say=False)
    pin, keys = (dev / "pin").read_text(), _public_keys(dev)
    assert DEV_KEY_LABEL in keys
    setup_dev_token(dev, say=False)
    assert (dev / "pin").read_text() == pin and _public_keys(dev) == keys
    assert (dev / "pin").stat().st_mode & 0o777 == 0o600


def test_a_lost_pin_file_makes_the_token_anew(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    setup_dev_token(dev, say=False)
    old = _public_keys(dev)
    (dev / "pin").unlink()
    setup_dev_token(dev, say=False)  # before: a new PIN for the old token, and every later run failed at login
    new = _public_keys(dev)  # logs in with the new PIN
    assert DEV_KEY_LABEL in new and new != old
