"""What trio-pgs logs when the application configured no logging.

A library does not configure logging: records go to whatever handlers the application
set up. When it set up none, Python prints WARNING and above through its last-resort
handler, with the traceback of every handled crash: a screenful per crash, for crashes
that the supervisor has already dealt with. So in that case, and only then, a record's
traceback is left out and its message says how to get it back; once any handler is
configured (``logging.basicConfig()``, pytest's capture, ...), records keep it.
"""

from __future__ import annotations

import logging

#: The loggers trio-pgs logs to; the filter is on each, since a logger's filters do not
#: apply to its children's records.
LOGGERS = ("trio_pgs", "trio_pgs.server", "trio_pgs.store", "trio_pgs.writer")

HINT = "(configure logging, e.g. logging.basicConfig(), to see the traceback)"


class OneLineWithoutHandlers(logging.Filter):
    """Drops a record's traceback when no handler would receive it but the last resort."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or record.exc_info == (None, None, None):
            return True
        if logging.getLogger(record.name).hasHandlers():
            return True
        record.msg = f"{record.getMessage()} {HINT}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


def install() -> None:
    """Put the filter on trio-pgs' loggers (once, however often it is imported)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineWithoutHandlers) for f in logger.filters):
            logger.addFilter(OneLineWithoutHandlers())


install()
