"""Exit statuses of the ``trio-pgs`` command, and the error that ends it with one.

docs/cli.md ("Exit status") lists the cases of each status; a new case belongs there.
"""

from __future__ import annotations

#: Done: the command did what was asked.
EXIT_OK = 0
#: The command ran and did not do all that was asked: no such record, a refusal, a
#: conflict with another writer, a failed read or write, an incomplete export.
EXIT_FAILED = 1
#: The command could not start, and changed nothing: bad usage, a store that cannot be
#: opened (missing, not a store, damaged, newer, in use), a bad import file.
EXIT_NOT_STARTED = 2
#: Interrupted (Ctrl-C): 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """Ends the command: the message goes to stderr, *code* is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code
