"""Logging set-up for the agent's processes: plain text or one JSON object per line, journald-friendly.

Under systemd (``$JOURNAL_STREAM`` set) text lines carry the ``<N>`` syslog priority prefix that journald
turns into the entry's priority, and no timestamp (journald adds its own).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

# Libraries that log HTTP header values at DEBUG (hpack logs table entries such as "authorization: Bearer
# …"; h2 logs frames). They stay at WARNING even with --verbose, so no token reaches a log.
_HEADER_LOGGERS = ("hpack", "h2")


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def configure(verbose: bool = False, *, fmt: str = "text", level: str | None = None) -> None:
    """(Re)configure the root logger; ``level`` overrides the default (info, or debug with --verbose)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    chosen = logging.DEBUG if verbose else getattr(logging, (level or "info").upper())
    logging.basicConfig(level=chosen, handlers=[handler], force=True)
    for name in _HEADER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
