"""Exit statuses of the ``trio-pgs`` command, and the error that ends it with one.

docs/cli.md lists every case of each status; a new case belongs in its table."""

from __future__ import annotations

EXIT_OK = 0
#: No such record; also a refusal, a conflict or a failed store operation.
EXIT_NOT_FOUND = 1
#: Bad usage, or a directory that is not a trio-pgs store.
EXIT_USAGE = 2
#: Interrupted (Ctrl-C): 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """Ends the command: the message goes to stderr, *code* is the exit status."""

    def __init__(self, message: str, code: int = EXIT_NOT_FOUND) -> None:
        super().__init__(message)
        self.code = code
