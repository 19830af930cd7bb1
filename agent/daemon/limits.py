"""The process's open-files limit, raised to what a daemon serving hundreds of connections needs.

systemd (and most login sessions) start services with a soft ``RLIMIT_NOFILE`` of 1024 and a much higher
hard limit, so that old programs using ``select()`` keep working; programs that do not are meant to raise
the soft limit themselves. A worker holds up to ``max_connections`` served connections, up to 1,024 turned-
away ones for a second each (so that they read their 503), the module's descriptors and the audit log: at
1024, a caller opening and holding refused connections could make ``accept()`` and the token's own file and
socket opens fail for everyone. The agent uses no ``select()`` on descriptors it accepts.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

OPEN_FILES = 65536  # the soft limit the agent asks for (or the hard limit, if that is lower)


def raise_open_files_limit(want: int = OPEN_FILES) -> int:
    """Raise the soft open-files limit to ``want`` or the hard limit, whichever is lower; never lower it.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, e)
    return soft
