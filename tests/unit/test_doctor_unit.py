"""``doctor --unit``'s reading of a unit (``systemctl show`` output as systemd 252 prints it, no systemd needed):
where its sandbox lets the agent write, and which groups it runs with."""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from agent.config import AuditConfig, TokenConfig
from agent.diagnostics import path_checks
from agent.diagnostics.path_checks import (
    WritePath,
    check_audit,
    check_audit_in_unit,
    check_sandbox,
    softhsm_token_dir,
)
from agent.diagnostics.unit import UnitError, UnitSandbox, parse_show, sandbox_from, settings_from, unit_ids

UNIT = "dfns-agent.service"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def shipped_show(tokens: Path, **changes: str) -> dict[str, str]:
    """The shipped unit's properties, its ReadWritePaths= pointing at ``tokens`` (it must exist to count)."""
    out = (
        "LoadState=loaded\nUser=dfns-agent\nGroup=dfns-agent\nSupplementaryGroups=\n"
        "Environment=XDG_STATE_HOME=/var/lib\nTriggeredBy=dfns-agent.socket\nProtectSystem=strict\n"
        f"ReadWritePaths=-{tokens}\nStateDirectory=dfns-agent\nLogsDirectory=\nCacheDirectory=\nRuntimeDirectory=\n"
    )
    return {**parse_show(out), **changes}


def sandbox(tmp_path: Path, **changes: str) -> UnitSandbox:
    return sandbox_from(UNIT, shipped_show(tmp_path, **changes))


def test_an_audit_log_outside_the_units_writable_paths_fails_with_the_setting_to_add(tmp_path: Path) -> None:
    check = check_audit_in_unit(AuditConfig(file=Path("/var/log/dfns-agent/audit.jsonl")), sandbox(tmp_path))
    assert check is not None and check.failed and check.name == "audit log"
    assert "ProtectSystem=strict" in check.detail and "/var/log/dfns-agent" in check.detail, check.detail
    assert check.fix is not None and "LogsDirectory=dfns-agent" in check.fix, check.fix
    assert "ReadWritePaths=/var/log/dfns-agent" in check.fix and f"systemctl edit {UNIT}" in check.fix, check.fix


def test_the_default_audit_log_under_state_directory_passes(tmp_path: Path) -> None:
    assert check_audit_in_unit(AuditConfig(file=Path("/var/lib/dfns-agent/audit.jsonl")), sandbox(tmp_path)) is None
    # LogsDirectory= opens /var/log/NAME, and a ReadWritePaths= entry anything below it.
    logs = sandbox(tmp_path, LogsDirectory="dfns-agent")
    assert check_audit_in_unit(AuditConfig(file=Path("/var/log/dfns-agent/audit.jsonl")), logs) is None
    assert check_audit_in_unit(AuditConfig(file=tmp_path / "audit" / "audit.jsonl"), sandbox(tmp_path)) is None


def test_the_state_and_token_directories_are_checked_too(tmp_path: Path) -> None:
    writes = [WritePath(Path("/var/lib/dfns-agent"), "state directory"), WritePath(tmp_path / "t", "SoftHSM tokens")]
    ok = check_sandbox(sandbox(tmp_path), writes)
    assert not ok.failed and "StateDirectory=dfns-agent" in ok.detail and f"ReadWritePaths=-{tmp_path}" in ok.detail
    elsewhere = tmp_path.parent / "not-opened"
    bad = check_sandbox(sandbox(tmp_path), [*writes, WritePath(elsewhere, "SoftHSM tokens")])
    assert bad.failed and bad.name == "sandbox" and f"{elsewhere} (SoftHSM tokens)" in bad.detail, bad.detail
    assert bad.fix is not None and f"create {elsewhere}" in bad.fix and f"ReadWritePaths={elsewhere}" in bad.fix


def test_prefixes_are_stripped_and_a_missing_read_write_path_opens_nothing(tmp_path: Path) -> None:
    here, missing = tmp_path / "a", tmp_path / "missing"
    here.mkdir()
    box = sandbox(tmp_path, ReadWritePaths=f"+{here} -{missing} :{tmp_path}/b", StateDirectory="x:y z")
    assert box.opened_by(here / "f") == f"ReadWritePaths=+{here}"
    assert box.opened_by(missing / "f") is None  # systemd ignores it: nothing there to mount writable
    assert box.opened_by(Path("/var/lib/x/f")) == "StateDirectory=x"
    assert box.opened_by(Path("/var/lib/z")) == "StateDirectory=z"
    assert box.opened_by(Path("/var/lib/y")) is None


def test_protect_system_full_and_yes_leave_other_trees_writable(tmp_path: Path) -> None:
    full, yes, off = (sandbox(tmp_path, ProtectSystem=v) for v in ("full", "yes", "no"))
    assert full.opened_by(Path("/etc/dfns-agent")) is None and full.opened_by(Path("/usr/local/x")) is None
    assert full.opened_by(Path("/var/log/dfns-agent")) is not None
    assert yes.opened_by(Path("/etc/dfns-agent")) is not None and yes.opened_by(Path("/boot/x")) is None
    assert off.opened_by(Path("/usr/x")) is not None
    assert not check_sandbox(off, [WritePath(Path("/usr/x"), "state directory")]).failed


def test_softhsm_token_directory_from_module_env_else_the_units_environment(tmp_path: Path) -> None:
    unit_conf, own_conf = tmp_path / "unit.conf", tmp_path / "own.conf"
    unit_conf.write_text("# SoftHSM v2\ndirectories.tokendir = /srv/tokens/\nobjectstore.backend = file\n")
    own_conf.write_text("directories.tokendir=/opt/tokens\n")
    env = (("SOFTHSM2_CONF", str(unit_conf)),)
    assert softhsm_token_dir(TokenConfig(module=SOFTHSM), env) == Path("/srv/tokens")
    own = TokenConfig(module=SOFTHSM, module_env={"SOFTHSM2_CONF": str(own_conf)})
    assert softhsm_token_dir(own, env) == Path("/opt/tokens")
    assert softhsm_token_dir(TokenConfig(module="/usr/lib/libykcs11.so"), env) is None
    assert softhsm_token_dir(TokenConfig(module=SOFTHSM), (("SOFTHSM2_CONF", str(tmp_path / "no")),)) is None


def test_a_rotating_audit_log_needs_a_writable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    real_access = os.access
    monkeypatch.setattr(path_checks.os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    check = check_audit(AuditConfig(file=log))
    assert check.failed and str(tmp_path) in check.detail and "rotation" in check.detail, check.detail
    assert not check_audit(AuditConfig(file=log, rotate_bytes=0)).failed  # never rotates: the file is enough


def two_groups() -> tuple[grp.struct_group, grp.struct_group]:
    groups = [g for g in grp.getgrall() if g.gr_gid != 0]
    if len(groups) < 2:
        pytest.skip("needs two groups besides root's")
    return groups[0], groups[1]


def test_group_and_supplementary_groups_are_applied_with_the_users_own() -> None:
    primary, extra = two_groups()
    props = {"User": "root", "Group": primary.gr_name, "SupplementaryGroups": f"{extra.gr_name} 4242"}
    ids = unit_ids(settings_from(UNIT, props, ""))
    assert ids.uid == 0 and ids.gid == primary.gr_gid
    assert set(os.getgrouplist("root", primary.gr_gid)) <= set(ids.groups)
    assert extra.gr_gid in ids.groups and 4242 in ids.groups
    # Without Group= the user's own group is the primary one, and SupplementaryGroups= still adds.
    ids = unit_ids(settings_from(UNIT, {"User": "root", "SupplementaryGroups": extra.gr_name}, ""))
    assert ids.gid == 0 and extra.gr_gid in ids.groups


def test_an_unknown_supplementary_group_is_a_unit_error() -> None:
    with pytest.raises(UnitError, match="no-such-group-xyz"):
        unit_ids(settings_from(UNIT, {"User": "root", "SupplementaryGroups": "no-such-group-xyz"}, ""))


def test_a_numeric_user_is_looked_up_by_uid() -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    ids = unit_ids(settings_from(UNIT, {"User": str(nobody.pw_uid)}, ""))
    assert (ids.uid, ids.gid, ids.name, ids.home) == (nobody.pw_uid, nobody.pw_gid, "nobody", nobody.pw_dir)
