"""The due index of a `DiskCacheStore` (`SupportsReminders`): a table of its own in
the cache's database, and the query that pages through it."""

from __future__ import annotations

import sqlite3

from ._schedule import Due

#: The due index (`SupportsReminders`): a table of its own in the cache's database, one
#: row per record whose `due_of` is not None, written in the transaction that writes the
#: record. Ordered by (kind, due, key), so that `due` seeks each kind at its cursor and
#: SQLite merges the kinds in order (a (due, kind, key) index cannot seek a cursor among
#: many equal due times, and walks the entries of every other kind).
DUE_TABLE = "trio_pgs_due"
CREATE_DUE = (
    f"CREATE TABLE IF NOT EXISTS {DUE_TABLE} (kind TEXT NOT NULL, key TEXT NOT NULL,"
    " due REAL NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID",
    f"CREATE INDEX IF NOT EXISTS {DUE_TABLE}_order ON {DUE_TABLE} (kind, due, key)",
)
SET_DUE = f"INSERT OR REPLACE INTO {DUE_TABLE} (kind, key, due) VALUES (?, ?, ?)"
DROP_DUE = f"DELETE FROM {DUE_TABLE} WHERE kind = ? AND key = ?"
ANY_DUE = f"SELECT 1 FROM {DUE_TABLE} WHERE kind = ? LIMIT 1"
#: What makes a row of the due table an entry `due` returns: a foreign or hand-made
#: row (another type, an empty key, a time that is no finite number) is never listed.
VALID_DUE = (
    " AND typeof(key) = 'text' AND key <> '' AND typeof(due) = 'real'"
    " AND abs(due) <= 1.7976931348623157e308"  # not a constraint the index could take
)
#: Kinds per query of `due` (a UNION ALL of one SELECT per kind; SQLite allows 500).
DUE_KINDS_PER_QUERY = 100


def due_query(
    kinds: list[str], after: Due | None, limit: int
) -> tuple[str, list[object]]:
    """The query of `DiskCacheStore.due` for *kinds*: for each kind, a seek in the due
    index to its first entry after *after*, and SQLite merges the kinds in order (a
    UNION ALL whose parts each come in order needs no sort), reading at most *limit*
    entries in all."""
    parts, parameters = [], []
    for kind in kinds:
        if after is None:
            since, values = "", []
        elif kind == after.kind:
            since, values = " AND (due, key) > (?, ?)", [after.due, after.key]
        elif kind > after.kind:  # its entries at after.due come after *after*
            since, values = " AND due >= ?", [after.due]
        else:
            since, values = " AND due > ?", [after.due]
        parts.append(f"SELECT due, kind, key FROM {DUE_TABLE} WHERE kind = ?{since}{VALID_DUE}")
        parameters += [kind, *values]
    sql = " UNION ALL ".join(parts) + " ORDER BY 1, 2, 3 LIMIT ?"
    return sql, [*parameters, limit]


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def has_due_table(connection: sqlite3.Connection) -> bool:
    found = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (DUE_TABLE,)
    ).fetchone()
    return found is not None
