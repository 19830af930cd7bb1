"""What one doctor check found: a typed result the CLI renders, so checks never print."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(Enum):
    """``skipped``: the check could not run because one it depends on failed (module → token → PIN → keys)."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """One check: its name, what it found, the fix for a failure, and warnings that do not fail the run."""

    name: str
    status: Status
    detail: str
    fix: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status is Status.FAILED


def passed(name: str, detail: str, *warnings: str) -> Check:
    return Check(name, Status.PASSED, detail, warnings=warnings)


def failed(name: str, problem: str, fix: str) -> Check:
    return Check(name, Status.FAILED, problem, fix)


def skipped(name: str, needs: str) -> Check:
    """``needs``: the failed check this one depends on; it is the detail."""
    return Check(name, Status.SKIPPED, f"needs {needs}")
