"""Logging set-up for the agent's processes."""

from __future__ import annotations

import logging
import sys

# Libraries that log HTTP header values at DEBUG (hpack logs table entries such as "authorization: Bearer
# …"; h2 logs frames). They stay at WARNING even with --verbose, so no token reaches a log.
_HEADER_LOGGERS = ("hpack", "h2")


class _ClientProtocolErrors(logging.Filter):
    """aiohttp logs every malformed request (the client's fault, already answered 400) at ERROR with a
    traceback; that lets anyone flood the log. Keep one debug line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg, record.args, record.exc_info, record.exc_text = f"bad request: {exc.message}", (), None, None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def configure(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in _HEADER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_ClientProtocolErrors())
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
