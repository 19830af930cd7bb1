"""Fixtures of the unit tests: nothing here needs SoftHSM, a token or an agent process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.metrics import ENV as METRICS_ENV
from agent.dev.testing import short_tempdir


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is limited to 107 bytes; pytest's tmp paths are long)."""
    with short_tempdir() as d:
        yield d


@pytest.fixture(autouse=True)
def _metrics_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics are this process's own here: no multiprocess directory inherited from the environment."""
    monkeypatch.delenv(METRICS_ENV, raising=False)
