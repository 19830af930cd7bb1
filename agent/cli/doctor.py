"""``dfns-agent doctor``: print each check of ``agent/diagnostics/doctor.py`` as it finishes (✓/✗, the fix
for each ✗), and exit 0 only when none failed."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click

from agent.cli.util import Context, socket_option
from agent.diagnostics.results import Check, Status

if TYPE_CHECKING:
    from agent.diagnostics.unit import UnitIds, UnitSettings


class Report:
    """Writes one check at a time, flushed (network checks take seconds); remembers whether any failed.

    On a stream that cannot encode ✓ and ✗ (e.g. ``PYTHONIOENCODING=ascii``) the marks are OK and FAIL.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ok = True
        self._yes, self._no = ("✓", "✗") if _can_encode(out, "✓✗") else ("OK", "FAIL")

    def add(self, check: Check) -> None:
        self.ok = self.ok and not check.failed
        self.out.write(self.render(check) + "\n")
        self.out.flush()

    def render(self, check: Check) -> str:
        if check.status is Status.SKIPPED:
            return f"- {check.name}: skipped ({check.detail})"
        lines = [f"{self._no if check.failed else self._yes} {check.name}: {check.detail}"]
        lines += [f"  warning: {w}" for w in check.warnings]
        if check.failed and check.fix:
            lines.append(f"  fix: {check.fix}")
        return "\n".join(lines)


def _can_encode(out: TextIO, text: str) -> bool:
    encoding = getattr(out, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


@click.command()
@socket_option(help="Check this socket path instead of the configured one.")
@click.option(
    "--unit",
    metavar="UNIT",
    help="Check as this systemd service will run (e.g. dfns-agent.service): as its user and groups, with its "
    "credentials, environment and socket. Run it as root (sudo).",
)
@click.pass_obj
def doctor(obj: Context, socket_path: str | None, unit: str | None) -> None:
    """Check everything the agent needs, with a fix for each problem.

    Module, token, PIN, keys, socket, config, audit log and Dfns (reachable, token accepted); exit 0 if
    all pass. The PIN is tried once; nothing is written.
    """
    report = Report(sys.stdout)
    if unit is not None:
        sys.exit(_as_unit(obj, report, unit, socket_path))
    _run_checks(obj, report, socket_path, None)
    sys.exit(0 if report.ok else 1)


def _run_checks(
    obj: Context, report: Report, socket_path: str | None, socket_unit: str | None, unit: UnitSettings | None = None
) -> None:
    from agent.diagnostics.doctor import run

    # config_path, not obj.config: a config that does not load is the doctor's first finding, not an error.
    with closing(run(obj.config_path, socket_override=socket_path, socket_unit=socket_unit, unit=unit)) as checks:
        for check in checks:
            report.add(check)


def _describe(settings: UnitSettings) -> str:
    who = f"runs as {settings.user}" if settings.user else "runs as root"
    if settings.group:
        who += f", group {settings.group}"
    if settings.supplementary_groups:
        who += f", supplementary groups {' '.join(settings.supplementary_groups)}"
    described = ", ".join(f"{c.name} ({c.source or 'not present'})" for c in settings.credentials) or "none"
    return f"{settings.name} {who}; credentials: {described}"


def _as_unit(obj: Context, report: Report, unit: str, socket_path: str | None) -> int:
    """Read the unit from systemd, then run every check in a child process that has what the service will
    have: its user and groups, a private $CREDENTIALS_DIRECTORY holding copies of its credentials, and
    its environment."""
    from agent.diagnostics.results import failed, passed
    from agent.diagnostics.unit import UnitError, read_unit, unit_ids

    if os.geteuid() != 0:
        fix = f"sudo dfns-agent --config FILE doctor --unit {unit}"
        report.add(failed("unit", f"reading {unit}'s credentials needs root", fix))
        return 1
    try:
        settings = read_unit(unit)
    except UnitError as e:
        report.add(failed("unit", e.message, "install the units: sudo dfns-agent files install"))
        return 1
    try:
        ids = unit_ids(settings)
    except UnitError as e:
        fix = "create it or correct User=, Group= or SupplementaryGroups=: systemd refuses to start the unit"
        report.add(failed("unit", e.message, fix))
        return 1
    missing = [c.name for c in settings.credentials if c.source is None and c.required]
    if missing:
        fix = f"create {', '.join(missing)} (mode 0600, root): systemd refuses to start without them"
        report.add(failed("unit", _describe(settings), fix))
    else:
        report.add(passed("unit", _describe(settings)))
    creds = Path(tempfile.mkdtemp(prefix="dfns-agent-doctor-"))
    try:
        _copy_credentials(settings, ids, creds)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if _child(obj, report, settings, ids, creds, socket_path) and not missing else 1
            except Exception:  # noqa: BLE001 - os._exit below would drop it unsaid
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 0
    finally:
        shutil.rmtree(creds, ignore_errors=True)


def _copy_credentials(settings: UnitSettings, ids: UnitIds, creds: Path) -> None:
    """What systemd does at start: the credentials, readable by the unit's user only."""
    for c in settings.credentials:
        if c.source is not None:
            target = creds / c.name
            shutil.copyfile(c.source, target)
            os.chmod(target, 0o400)
            os.chown(target, ids.uid, ids.gid)
    os.chmod(creds, 0o500)
    os.chown(creds, ids.uid, ids.gid)


def _child(
    obj: Context, report: Report, settings: UnitSettings, ids: UnitIds, creds: Path, socket_path: str | None
) -> bool:
    """In the forked child: become the unit's user and groups, with its environment, and run every check;
    whether all passed."""
    from agent.diagnostics.unit import as_unit_user

    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)
    os.environ.update(dict(settings.environment))
    if settings.user:
        os.environ["HOME"] = ids.home
        os.environ["USER"] = os.environ["LOGNAME"] = ids.name
    as_unit_user(ids)
    sock = socket_path or (str(settings.socket) if settings.socket else None)
    _run_checks(obj, report, sock, settings.socket_unit if socket_path is None else None, settings)
    return report.ok
