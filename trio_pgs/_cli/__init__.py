"""The ``trio-pgs`` command: inspect and repair a trio-pgs store (docs/cli.md).

Every command goes through the store's own API: reads are plain loads and scans, and
writes are conditional, versioned commits, so a command never corrupts a store that a
running application holds open; a concurrent change makes it stop with a conflict
instead of overwriting.

The modules, one idea each: `_main` (the parser and ``main``), `_exit` (exit statuses),
`_opener` (from a store spec to an open store), `_commands` (the commands),
`_exchange` (the export format), `_output` (tables, escapes, progress).
"""

from ._main import main as main
