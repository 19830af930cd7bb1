"""``dfns-agent doctor``: print each check of ``agent/diagnostics/doctor.py`` as it finishes (✓/✗, the fix
for each ✗), and exit 0 only when none failed."""

from __future__ import annotations

import sys
from contextlib import closing
from typing import TextIO

import click

from agent.cli.util import Context, socket_option
from agent.diagnostics.results import Check, Status


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
@click.pass_obj
def doctor(obj: Context, socket_path: str | None) -> None:
    """Check everything the agent needs, with a fix for each problem.

    Module, token, PIN, keys, socket, config, audit log and Dfns (reachable, token accepted); exit 0 if
    all pass. The PIN is tried once; nothing is written.
    """
    from agent.diagnostics.doctor import run

    report = Report(sys.stdout)
    # config_path, not obj.config: a config that does not load is the doctor's first finding, not an error.
    with closing(run(obj.config_path, socket_override=socket_path)) as checks:
        for check in checks:
            report.add(check)
    sys.exit(0 if report.ok else 1)
