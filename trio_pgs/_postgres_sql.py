"""The SQL of `PostgresStore`: its schema and migrations, and how a batch of operations
becomes statements. Everything here runs on a worker thread, on one connection.

The records table keeps one row per (kind, key), deleted ones included: a deleted
record is a tombstone row (``deleted``, no data) holding its last version and epoch,
so that a record created again under the key continues them, and rows are never
removed. Every condition the store checks is in a WHERE clause; a statement that
matches no row is an operation refused, and the row as stored says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs

from ._errors import ConflictError, PersistenceError
from ._schedule import pack_reminders
from ._store import Delete, Operation, Put, Record, check_version, due_of

if TYPE_CHECKING:
    import psycopg

Ident = tuple[str, str]

#: The columns of a record, in the order `decode` reads them.
COLUMNS = (
    "kind, key, version, epoch, deleted, data, state_version, updated_at, crashes,"
    " quarantined, history, reminders"
)
#: Where `deleted` is in a row of COLUMNS.
DELETED = 4

#: The migrations, in order: the schema version is how many have run. A migration is
#: never changed once released; a new one is appended.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE {schema}.records (
            kind text NOT NULL,
            key text NOT NULL,
            version bigint NOT NULL,
            epoch bigint NOT NULL,
            deleted boolean NOT NULL DEFAULT false,
            data bytea,
            state_version bigint NOT NULL,
            updated_at double precision NOT NULL,
            crashes double precision[] NOT NULL DEFAULT '{{}}',
            quarantined boolean NOT NULL DEFAULT false,
            history bytea[] NOT NULL DEFAULT '{{}}',
            PRIMARY KEY (kind, key)
        )
        """,
    ),
    (
        # Membership (docs/cluster.md): one row per supervisor name counts its joins;
        # one row per member holds its lease, timed by the database's clock.
        """
        CREATE TABLE {schema}.supervisors (
            supervisor text PRIMARY KEY,
            joins bigint NOT NULL DEFAULT 0
        )
        """,
        """
        CREATE TABLE {schema}.nodes (
            supervisor text NOT NULL,
            node text NOT NULL,
            incarnation bigint NOT NULL,
            address text NOT NULL,
            clustered boolean NOT NULL,
            host text NOT NULL,
            pid bigint NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL,
            leaving boolean NOT NULL DEFAULT false,
            active bigint NOT NULL DEFAULT 0,
            proof text NOT NULL DEFAULT '',
            PRIMARY KEY (supervisor, node)
        )
        """,
    ),
    (
        # Reminders (docs/howto/reminders.md): kept with the record, as the JSON text
        # of `pack_reminders`; `due` is the record's place in the due index (NULL: no
        # reminder, or quarantined), and the partial index is that due index.
        "ALTER TABLE {schema}.records ADD COLUMN reminders text NOT NULL DEFAULT ''",
        "ALTER TABLE {schema}.records ADD COLUMN due double precision",
        "CREATE INDEX records_due ON {schema}.records (due, kind, key) WHERE due IS NOT NULL",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


@attrs.define
class Phase:
    """How far a transaction went: once COMMIT is sent, a lost connection leaves its
    outcome unknown; before, nothing was written."""

    committing: bool = False
    #: The transaction is known to have committed: whatever fails after it, the
    #: outcome is the one it had.
    committed: bool = False


class Queries:
    """The statements of one schema, formatted once. The schema name was checked to
    be a plain identifier, so quoting it is enough."""

    def __init__(self, schema: str) -> None:
        self.schema = f'"{schema}"'
        s = self.schema
        self.load = (
            f"SELECT {COLUMNS} FROM {s}.records WHERE kind = %s AND key = %s AND NOT deleted"
        )
        self.scan = (
            f"SELECT {COLUMNS} FROM {s}.records WHERE kind = %s AND key > %s AND NOT deleted"
            " ORDER BY key LIMIT %s"
        )
        self.scan_first = (
            f"SELECT {COLUMNS} FROM {s}.records WHERE kind = %s AND NOT deleted"
            " ORDER BY key LIMIT %s"
        )
        # (a row of an empty kind is no record: no class can serve it)
        self.kinds = f"SELECT DISTINCT kind FROM {s}.records WHERE NOT deleted AND kind <> ''"
        self.claim = (
            f"UPDATE {s}.records SET epoch = epoch + 1 WHERE kind = %s AND key = %s"
            f" RETURNING {COLUMNS}"
        )
        self.stored = (
            f"SELECT key, version, epoch FROM {s}.records WHERE kind = %s AND key = ANY(%s)"
        )
        self.insert = (
            f"INSERT INTO {s}.records (kind, key, version, epoch, data, state_version,"
            " updated_at, crashes, quarantined, history, reminders, due)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s::float8[], %s, %s::bytea[], %s, %s)"
            " ON CONFLICT (kind, key) DO NOTHING RETURNING 1"
        )
        self.update = (
            f"UPDATE {s}.records SET version = %s, epoch = %s, deleted = false, data = %s,"
            " state_version = %s, updated_at = %s, crashes = %s::float8[], quarantined = %s,"
            " history = %s::bytea[], reminders = %s, due = %s"
            " WHERE kind = %s AND key = %s AND version = %s AND epoch <= %s RETURNING 1"
        )
        self.delete = (
            f"UPDATE {s}.records SET deleted = true, data = NULL, crashes = '{{}}',"
            " quarantined = false, history = '{}', reminders = '', due = NULL, updated_at = %s"
            " WHERE kind = %s AND key = %s"
            " AND (%s::bigint IS NULL OR version = %s) AND (%s::bigint IS NULL OR epoch <= %s)"
            " RETURNING 1"
        )
        # The common case in one statement for a whole round: records with no crash
        # times and no history (their arrays cannot go through unnest).
        unnested = (
            "unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bytea[],"
            " %s::bigint[], %s::float8[], %s::boolean[], %s::bigint[], %s::text[],"
            " %s::float8[])"
            " AS u(kind, key, version, epoch, data, state_version, updated_at, quarantined,"
            " expected, reminders, due)"
        )
        self.insert_bulk = (
            f"INSERT INTO {s}.records (kind, key, version, epoch, data, state_version,"
            " updated_at, quarantined, reminders, due)"
            " SELECT u.kind, u.key, u.version, u.epoch, u.data, u.state_version,"
            f" u.updated_at, u.quarantined, u.reminders, u.due FROM {unnested}"
            " ON CONFLICT (kind, key) DO NOTHING RETURNING kind, key"
        )
        self.update_bulk = (
            f"UPDATE {s}.records AS r SET version = u.version, epoch = u.epoch,"
            " deleted = false, data = u.data, state_version = u.state_version,"
            " updated_at = u.updated_at, crashes = '{}', quarantined = u.quarantined,"
            f" history = '{{}}', reminders = u.reminders, due = u.due FROM {unnested}"
            " WHERE r.kind = u.kind AND r.key = u.key AND r.version = u.expected"
            " AND r.epoch <= u.epoch RETURNING r.kind, r.key"
        )
        self.version = f"SELECT value FROM {s}.meta WHERE name = 'schema_version'"
        # The due index, a page at a time: through the partial index, in its order.
        self.due_first = (
            f"SELECT due, kind, key FROM {s}.records WHERE due IS NOT NULL"
            " AND kind = ANY(%s) ORDER BY due, kind, key LIMIT %s"
        )
        self.due_after = (
            f"SELECT due, kind, key FROM {s}.records WHERE due IS NOT NULL"
            " AND kind = ANY(%s) AND (due, kind, key) > (%s, %s, %s)"
            " ORDER BY due, kind, key LIMIT %s"
        )


# -- the schema ------------------------------------------------------------------------


def prepare(
    connection: psycopg.Connection[Any], queries: Queries, *, read_only: bool, create: bool
) -> None:
    """Make sure the schema holds the tables of this version: create or upgrade them
    (unless *read_only*; a missing store only if *create*), or refuse a schema
    written by a newer trio-pgs. Safe when several processes open the same database
    at once: they take turns on the row of the schema version, and only the first
    migrates."""
    found = _schema_version(connection, queries)
    if found == SCHEMA_VERSION:
        return
    where = f"schema {queries.schema} of this database"
    if found is not None and found > SCHEMA_VERSION:
        raise PersistenceError(
            f"the tables in {where} were upgraded by a newer trio-pgs (schema version "
            f"{found}; this one knows {SCHEMA_VERSION}); upgrade trio-pgs"
        )
    if found is None and not create:
        raise PersistenceError(f"there is no trio-pgs store in {where}")
    if read_only:
        raise PersistenceError(
            f"there is no trio-pgs store in {where}" if found is None else
            f"the trio-pgs tables in {where} are of an older version ({found}); open the "
            "store once without read_only=True to upgrade them"
        )
    _create_schema(connection, queries)
    _migrate(connection, queries)


def _schema_version(connection: psycopg.Connection[Any], queries: Queries) -> int | None:
    import psycopg

    try:
        row = connection.execute(queries.version).fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return None
    return None if row is None else int(row[0])


def _create_schema(connection: psycopg.Connection[Any], queries: Queries) -> None:
    import psycopg

    s = queries.schema
    for attempt in range(5):
        try:
            with connection.transaction():
                connection.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                connection.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.meta"
                    " (name text PRIMARY KEY, value bigint NOT NULL)"
                )
                connection.execute(
                    f"INSERT INTO {s}.meta VALUES ('schema_version', 0)"
                    " ON CONFLICT (name) DO NOTHING"
                )
            return
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject,
                psycopg.errors.DuplicateSchema, psycopg.errors.DuplicateTable):
            # Another process created the same thing at the same moment (IF NOT EXISTS
            # does not exclude the race): it exists now, so the next try sees it.
            if attempt == 4:
                raise


def _migrate(connection: psycopg.Connection[Any], queries: Queries) -> None:
    with connection.transaction():
        row = connection.execute(queries.version + " FOR UPDATE").fetchone()
        found = 0 if row is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise PersistenceError(
                f"the tables in schema {queries.schema} were upgraded by a newer trio-pgs "
                f"meanwhile (schema version {found}); upgrade trio-pgs"
            )
        for statements in MIGRATIONS[found:]:
            for statement in statements:
                connection.execute(statement.format(schema=queries.schema))
        connection.execute(
            f"UPDATE {queries.schema}.meta SET value = %s WHERE name = 'schema_version'",
            (SCHEMA_VERSION,),
        )


# -- a batch of operations --------------------------------------------------------------


def ident(operation: Operation) -> Ident:
    if isinstance(operation, Delete):
        return operation.kind, operation.key
    return operation.record.kind, operation.record.key


def apply(
    connection: psycopg.Connection[Any], queries: Queries, operations: Sequence[Operation],
    atomic: bool, phase: Phase,
) -> list[ConflictError | None]:
    """Apply *operations* in one transaction on *connection*; return each one's
    outcome. *atomic*: the first refused raises its `ConflictError` (nothing is
    written). Otherwise a refused operation is skipped, and so is every later one on
    the same record (it was meant to follow the refused one).

    The operations go in rounds, a record at most once per round: within one, the
    statements are independent, and go to the server together (a pipeline)."""
    outcomes: list[ConflictError | None] = [None] * len(operations)
    rounds = _rounds(operations)
    if not atomic and len(rounds) == 1 and _one_statement(operations):
        # The group-commit writer's usual batch: one statement, which commits itself
        # (one round trip, no BEGIN or COMMIT). It commits as it is sent.
        phase.committing = True
        unmatched = _unmatched(connection, queries, operations, rounds[0])
        phase.committed = True  # from here on, nothing may say "not committed"
        try:
            refusals = _explained(connection, queries, operations, unmatched)
        except Exception:  # the statement stands; only its explanation failed
            refusals = [(index, conflict(None, operations[index])) for index in unmatched]
        for index, refusal in refusals:
            outcomes[index] = refusal
        return outcomes
    refused_records: set[Ident] = set()
    with connection.pipeline(), connection.transaction():
        for indexes in rounds:
            todo = []
            for index in indexes:
                if ident(operations[index]) in refused_records:
                    kind, key = ident(operations[index])
                    outcomes[index] = ConflictError(
                        f"{kind}/{key}: an earlier write to it in the same batch was refused"
                    )
                else:
                    todo.append(index)
            for index, refused in _refusals(connection, queries, operations, todo):
                if atomic:
                    raise refused
                outcomes[index] = refused
                refused_records.add(ident(operations[index]))
        phase.committing = True
    return outcomes


def _one_statement(operations: Sequence[Operation]) -> bool:
    """Whether *operations* (on distinct records) are one bulk statement: all plain
    puts, all creating or all updating."""
    creating = set()
    for operation in operations:
        if not isinstance(operation, Put) or not _plain(operation):
            return False
        creating.add(operation.expected_version == 0)
    return len(creating) == 1


def _rounds(operations: Sequence[Operation]) -> list[list[int]]:
    """The indexes of *operations*, in rounds: the n-th operation on a record goes in
    the n-th round."""
    seen: dict[Ident, int] = {}
    rounds: list[list[int]] = []
    for index, operation in enumerate(operations):
        record = ident(operation)
        n = seen.get(record, 0)
        seen[record] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(index)
    return rounds


def _refusals(
    connection: psycopg.Connection[Any], queries: Queries, operations: Sequence[Operation],
    indexes: list[int],
) -> list[tuple[int, ConflictError]]:
    """Run one round; return the operations it refused, each with its conflict."""
    unmatched = _unmatched(connection, queries, operations, indexes)
    return _explained(connection, queries, operations, unmatched)


def _unmatched(
    connection: psycopg.Connection[Any], queries: Queries, operations: Sequence[Operation],
    indexes: list[int],
) -> list[int]:
    """Run one round's statements; return the operations that matched no row."""
    inserts: list[int] = []
    updates: list[int] = []
    deletes: list[int] = []
    for index in indexes:
        operation = operations[index]
        if isinstance(operation, Delete):
            deletes.append(index)
        elif operation.expected_version == 0:
            inserts.append(index)
        else:
            updates.append(index)
    sent: list[tuple[Any, list[int], bool]] = []
    for bulk_query, query, group, params in (
        (queries.insert_bulk, queries.insert, inserts, _insert_params),
        (queries.update_bulk, queries.update, updates, _update_params),
        (None, queries.delete, deletes, _delete_params),
    ):
        if bulk_query is not None:
            plain, group = _partition(operations, group)
            if plain:
                cursor = connection.cursor()
                cursor.execute(bulk_query, _bulk_params(operations, plain))
                sent.append((cursor, plain, True))
        if group:
            cursor = connection.cursor()
            cursor.executemany(
                query, [params(operations[index]) for index in group], returning=True
            )
            sent.append((cursor, group, False))
    unmatched: list[int] = []
    for cursor, group, bulk in sent:
        if bulk:
            matched = set(cursor.fetchall())
            unmatched += [i for i in group if ident(operations[i]) not in matched]
        else:
            unmatched += [
                index for index, _ in zip(group, cursor.results(), strict=True)
                if cursor.rowcount == 0
            ]
    return unmatched


def _explained(
    connection: psycopg.Connection[Any], queries: Queries, operations: Sequence[Operation],
    unmatched: list[int],
) -> list[tuple[int, ConflictError]]:
    """The operations that matched no row, each with its conflict, which the rows as
    stored say (a delete of what was never stored, expecting nothing, is done)."""
    if not unmatched:
        return []
    stored = _stored(connection, queries, [ident(operations[index]) for index in unmatched])
    refusals = []
    for index in unmatched:
        operation = operations[index]
        current = stored.get(ident(operation))
        if isinstance(operation, Delete) and current is None:
            try:
                check_version(None, operation)
                continue  # deleting what was never stored, expecting nothing: done
            except ConflictError as exc:
                refusals.append((index, exc))
                continue
        refusals.append((index, conflict(current, operation)))
    return refusals


def _stored(
    connection: psycopg.Connection[Any], queries: Queries, idents: list[Ident]
) -> dict[Ident, tuple[int, int]]:
    by_kind: dict[str, list[str]] = {}
    for kind, key in idents:
        by_kind.setdefault(kind, []).append(key)
    stored = {}
    for kind, keys in by_kind.items():
        for key, version, epoch in connection.execute(queries.stored, (kind, keys)).fetchall():
            stored[kind, key] = (version, epoch)
    return stored


def conflict(current: tuple[int, int] | None, operation: Operation) -> ConflictError:
    """The conflict *operation* met over the stored (version, epoch), when the server
    refused it: that of `check_version`, or (the row changed again since) a plain one."""
    try:
        check_version(current, operation)
    except ConflictError as exc:
        return exc
    kind, key = ident(operation)
    return ConflictError(f"{kind}/{key}: another writer changed it meanwhile; it was not written")


def _plain(operation: Operation) -> bool:
    """Whether a put's record has no crash times and no history: the common case,
    which one statement writes for a whole round."""
    assert isinstance(operation, Put)
    return not operation.record.crashes and not operation.record.history


def _partition(
    operations: Sequence[Operation], indexes: list[int]
) -> tuple[list[int], list[int]]:
    """*indexes* split into the plain puts (`_plain`) and the others."""
    plain: list[int] = []
    others: list[int] = []
    for index in indexes:
        (plain if _plain(operations[index]) else others).append(index)
    return plain, others


def _bulk_params(operations: Sequence[Operation], indexes: list[int]) -> tuple[str, ...]:
    """The columns of the plain puts at *indexes*, as array literals for unnest.

    Formatted here, as text the server parses, rather than adapted element by element
    by psycopg: for a batch of 100 puts that is 0.1 ms instead of 1.7."""
    puts = [cast(Put, operations[index]) for index in indexes]
    records = [put.record for put in puts]
    return (
        _texts([r.kind for r in records]),
        _texts([r.key for r in records]),
        _integers([r.version for r in records]),
        _integers([r.epoch for r in records]),
        "{" + ",".join([f'"\\\\x{r.data.hex()}"' for r in records]) + "}",
        _integers([r.state_version for r in records]),
        "{" + ",".join([_float(r.updated_at) for r in records]) + "}",
        "{" + ",".join(["t" if r.quarantined else "f" for r in records]) + "}",
        _integers([put.expected_version for put in puts]),
        _texts([pack_reminders(r.reminders) for r in records]),
        "{" + ",".join([_due(r) for r in records]) + "}",
    )


def _due(record: Record) -> str:
    """*record*'s entry of the due index as an array literal's element."""
    due = due_of(record)
    return "NULL" if due is None else _float(due)


def _texts(values: list[str]) -> str:
    """An array literal of strings: each one quoted, its backslashes and quotes
    escaped (NUL, which text cannot hold, was refused before)."""
    quoted = [
        '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values
    ]
    return "{" + ",".join(quoted) + "}"


def _integers(values: list[int]) -> str:
    return "{" + ",".join([str(int(value)) for value in values]) + "}"


def _float(value: float) -> str:
    value = float(value)
    if math.isfinite(value):
        return repr(value)
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _insert_params(operation: Operation) -> tuple[Any, ...]:
    assert isinstance(operation, Put)
    r = operation.record
    return (r.kind, r.key, r.version, r.epoch, r.data, r.state_version, r.updated_at,
            list(r.crashes), r.quarantined, list(r.history), pack_reminders(r.reminders),
            due_of(r))


def _update_params(operation: Operation) -> tuple[Any, ...]:
    assert isinstance(operation, Put)
    r = operation.record
    return (r.version, r.epoch, r.data, r.state_version, r.updated_at, list(r.crashes),
            r.quarantined, list(r.history), pack_reminders(r.reminders), due_of(r), r.kind,
            r.key, operation.expected_version, r.epoch)


def _delete_params(operation: Operation) -> tuple[Any, ...]:
    assert isinstance(operation, Delete)
    expected, epoch = operation.expected_version, operation.epoch
    return (time.time(), operation.kind, operation.key, expected, expected, epoch, epoch)
