"""Logging set-up for the agent's processes."""

from __future__ import annotations

import logging
import sys

# Libraries that log HTTP header values at DEBUG (hpack logs table entries such as "authorization: Bearer
# …"; h2 logs frames). They stay at WARNING even with --verbose, so no token reaches a log.
_HEADER_LOGGERS = ("hpack", "h2")


def configure(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in _HEADER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
