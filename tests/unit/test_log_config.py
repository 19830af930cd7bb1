"""Logging set-up (``agent/logs.py``) in this process: what ``--verbose`` turns on and what it keeps quiet."""

from __future__ import annotations


def test_http2_header_loggers_stay_quiet_in_verbose_mode() -> None:
    """hpack logs header values (the bearer token) at DEBUG; --verbose must not turn that on."""
    import logging

    from agent import logs

    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.DEBUG)  # what --verbose gives a fresh process (pytest already configured logging)
    try:
        logs.configure(verbose=True)
        for name in ("hpack", "hpack.hpack", "hpack.table", "h2"):
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
        assert logging.getLogger("httpcore").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved)
