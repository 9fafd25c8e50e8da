"""The ``trio-pgs`` command: inspect and repair a `DiskCacheStore` directory.

Every command goes through the store's own API: reads are plain loads and scans, and
writes are conditional, versioned commits (SQLite transactions), so a command never
corrupts a store that a running application holds open; a concurrent change makes it
stop with a conflict instead of overwriting.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeVar

import attrs
import trio

from . import __version__
from ._diskcache_store import DiskCacheStore
from ._encoding import dumps, loads
from ._errors import ConflictError, PersistenceError
from ._ref import check_key
from ._server import check_kind
from ._store import Delete, Put, Record, next_version

T = TypeVar("T")

EXIT_OK = 0
#: No such record; also a refusal, a conflict or a failed store operation.
EXIT_NOT_FOUND = 1
#: Bad usage, or a directory that is not a trio-pgs store.
EXIT_USAGE = 2
#: Import and export show progress on a terminal from this many records.
PROGRESS_MIN = 1000
#: Records per transaction on import: small, so a running application's writes are
#: never held up for long.
IMPORT_BATCH = 500
_DATABASE = "cache.db"  # the SQLite file of a diskcache directory
_FIELDS = frozenset(field.name for field in attrs.fields(Record)) | {"data_base64"}
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class CommandError(Exception):
    """Ends the command: the message goes to stderr, *code* is the exit status."""

    def __init__(self, message: str, code: int = EXIT_NOT_FOUND) -> None:
        super().__init__(message)
        self.code = code


# -- the store --------------------------------------------------------------------------


def _store(directory: str, *, create: bool = False, write: bool = False) -> DiskCacheStore:
    """The store in *directory*, checked before opening: opening creates a store, which
    only import may do (in a new or empty directory)."""
    path = Path(directory)
    if path.is_dir():
        if not (path / _DATABASE).is_file() and not (create and not any(path.iterdir())):
            where = "; import into a new or empty directory" if create else ""
            raise CommandError(
                f"{directory} is not a trio-pgs store (it has no {_DATABASE}){where}", EXIT_USAGE
            )
    elif path.exists():
        raise CommandError(f"{directory} is not a directory", EXIT_USAGE)
    elif not create:
        raise CommandError(f"{directory}: no such directory", EXIT_USAGE)
    # Writes are few and a user was told they happened: make them survive a power cut.
    return DiskCacheStore(path, durable=write)


def _session(store: DiskCacheStore, work: Callable[[DiskCacheStore], Awaitable[T]]) -> T:
    """Open *store*, run *work* on it under `trio.run`, close it."""

    async def run() -> T:
        try:
            await store.open()
        except PersistenceError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return trio.run(run)
    except ConflictError as exc:
        raise CommandError(f"{exc}. That change was not made; look again, then retry.") from None
    except PersistenceError as exc:
        raise CommandError(str(exc)) from None


async def _each(store: DiskCacheStore, kind: str | None, visit: Callable[[Record], None]) -> int:
    """Call *visit* with every record (of *kind*), by kind then key; print each row
    that is not a valid record, and return how many were skipped."""
    skipped = 0

    def report(kind: str, key: str, error: PersistenceError) -> None:
        nonlocal skipped
        skipped += 1
        print(f"trio-pgs: scan skipped {kind}/{key}: {error}", file=sys.stderr)

    for each in [kind] if kind is not None else sorted(await store.kinds()):
        async for record in store.scan(each, on_skip=functools.partial(report, each)):
            visit(record)
    return skipped


def _load(directory: str, kind: str, key: str) -> Record:
    record = _session(_store(directory), lambda store: store.load(kind, key))
    if record is None:
        raise CommandError(f"{_ident(kind, key)}: no such record in {directory}")
    return record


# -- the export format ------------------------------------------------------------------


def record_to_json(record: Record) -> dict[str, Any]:
    """*record* as one object of the export: every field; the state as JSON when its
    bytes are exactly what trio-pgs writes for that JSON (else ``data_base64``), so
    an import restores the same bytes; the history base64."""
    exported: dict[str, Any] = {"kind": record.kind, "key": record.key}
    try:
        state = loads(record.data)
        readable = dumps(state) == record.data
    except (ValueError, TypeError):
        readable = False
    if readable:
        exported["data"] = state
    else:
        exported["data_base64"] = base64.b64encode(record.data).decode("ascii")
    exported.update(
        version=record.version,
        state_version=record.state_version,
        epoch=record.epoch,
        updated_at=record.updated_at,
        crashes=list(record.crashes),
        quarantined=record.quarantined,
        history=[base64.b64encode(old).decode("ascii") for old in record.history],
    )
    return exported


def record_from_json(obj: Any) -> Record:
    """The record an export object describes; `ValueError` says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    if ("data" in obj) == ("data_base64" in obj):
        raise ValueError("give the state as either data (JSON) or data_base64")
    history, crashes = obj.get("history", []), obj.get("crashes", [])
    if not isinstance(history, list):
        raise ValueError("history must be a list of base64 strings")
    if not isinstance(crashes, list) or not all(map(_is_number, crashes)):
        raise ValueError("crashes must be a list of times (numbers)")
    if not isinstance(obj.get("quarantined", False), bool):
        raise ValueError("quarantined must be true or false")
    try:
        data = _b64(obj["data_base64"]) if "data_base64" in obj else dumps(obj["data"])
        return Record(
            check_kind(obj.get("kind")),
            check_key(obj.get("key")),
            data,
            _int(obj, "version", 1, 1),
            _int(obj, "state_version", 1, 1),
            _int(obj, "epoch", 0, 0),
            _number(obj, "updated_at"),
            tuple(map(float, crashes)),
            obj.get("quarantined", False),
            tuple(map(_b64, history)),
        )
    except TypeError as exc:  # check_kind, check_key and dumps say what they refuse
        raise ValueError(str(exc)) from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(obj: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = obj.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


def _number(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name, 0.0)
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, not {value!r}")
    return float(value)


def _b64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, not {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64 ({exc})") from None


def _read_records(lines: Iterable[str], name: str) -> list[Record]:
    """Every record of an export, all checked before anything is written."""
    records: list[Record] = []
    seen: dict[tuple[str, str], int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = record_from_json(json.loads(line))
        except ValueError as exc:  # json.JSONDecodeError included
            raise CommandError(f"{name}, line {number}: {exc}", EXIT_USAGE) from None
        ident = (record.kind, record.key)
        if ident in seen:
            raise CommandError(
                f"{name}, line {number}: {_ident(record.kind, record.key)} is already on line "
                f"{seen[ident]}",
                EXIT_USAGE,
            )
        seen[ident] = number
        records.append(record)
    return records


# -- output -----------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int]) -> None:
    """Aligned columns on a terminal (the *numeric* ones right-aligned), tab-separated
    values when piped. Backslashes, tabs and newlines in values are escaped."""
    cells = [list(header), *([str(value).translate(_ESCAPES) for value in row] for row in rows)]
    if not sys.stdout.isatty():
        for row in cells:
            print("\t".join(row))
        return
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    for row in cells:
        print("  ".join(
            cell.rjust(width) if column in numeric else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip())


def _iso(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ident(kind: str, key: str) -> str:
    """A server's name in messages, with its control characters escaped."""
    return f"{kind}/{key}".translate(_ESCAPES)


def _status(record: Record) -> str:
    return "quarantined" if record.quarantined else "ok"


class _Progress:
    """A count redrawn in place on stderr, when it is a terminal and the job is big."""

    def __init__(self, verb: str, total: int | None = None, *, quiet: bool = False) -> None:
        self.verb, self.total, self.count = verb, total, 0
        self._enabled = not quiet and sys.stderr.isatty()
        self._enabled &= total is None or total >= PROGRESS_MIN
        self._shown, self._next = False, 0.0

    def step(self, records: int = 1) -> None:
        self.count += records
        if not self._enabled or (self.total is None and self.count < PROGRESS_MIN):
            return
        if (now := time.monotonic()) >= self._next:
            self._next = now + 0.1
            self._draw()

    def _draw(self) -> None:
        of = "" if self.total is None else f"/{self.total}"
        sys.stderr.write(f"\r{self.verb} {self.count}{of} records")
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self._draw()
            sys.stderr.write("\n")


# -- the commands -----------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    rows: list[tuple[object, ...]] = []

    def visit(r: Record) -> None:
        rows.append((r.kind, r.key, _status(r), r.version, r.state_version,
                     _iso(r.updated_at), len(r.data)))

    _session(_store(args.directory), lambda store: _each(store, args.kind, visit))
    header = ("KIND", "KEY", "STATUS", "VERSION", "STATE_VERSION", "UPDATED", "SIZE")
    _table(header, rows, numeric={3, 4, 6})
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    record = _load(args.directory, args.kind, args.key)
    exported = record_to_json(record)
    if args.meta:
        print(json.dumps(exported, indent=2, ensure_ascii=False))
        return EXIT_OK
    crashes = ", ".join(map(_iso, record.crashes))
    for name, value in [
        ("record", _ident(record.kind, record.key)),
        ("status", _status(record)),
        ("version", record.version),
        ("state_version", record.state_version),
        ("epoch", record.epoch),
        ("updated", _iso(record.updated_at)),
        ("crashes", f"{len(record.crashes)}" + (f" ({crashes})" if crashes else "")),
        ("history", f"{len(record.history)} earlier state(s)"),
        ("size", f"{len(record.data)} bytes"),
    ]:
        print(f"{name + ':':<15}{value}", file=sys.stderr)
    if "data" in exported:
        print(json.dumps(exported["data"], indent=2, ensure_ascii=False))
    else:
        print("the state is not JSON; here are its bytes in base64:", file=sys.stderr)
        print(exported["data_base64"])
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    kinds: dict[str, list[int]] = {}

    def visit(record: Record) -> None:
        counts = kinds.setdefault(record.kind, [0, 0, 0])
        counts[0] += 1
        counts[1] += record.quarantined
        counts[2] += len(record.data) + sum(map(len, record.history))

    _session(_store(args.directory), lambda store: _each(store, None, visit))
    total = [sum(counts[column] for counts in kinds.values()) for column in range(3)]
    rows = [(kind, *counts) for kind, counts in sorted(kinds.items())]
    _table(("KIND", "RECORDS", "QUARANTINED", "BYTES"), [*rows, ("(total)", *total)],
           numeric={1, 2, 3})
    return EXIT_OK


def _release(args: argparse.Namespace) -> int:
    kind, key = args.kind, args.key

    async def release(store: DiskCacheStore) -> tuple[Record | None, bool]:
        record = await store.load(kind, key)
        if record is None or not record.quarantined:
            return record, False
        released = next_version(record, quarantined=False, crashes=())
        await store.commit([Put(released, record.version)])
        return released, True

    record, released = _session(_store(args.directory, write=True), release)
    if record is None:
        raise CommandError(f"{_ident(kind, key)}: no such record in {args.directory}")
    if released:
        print(f"released {_ident(kind, key)} (now at version {record.version})")
    else:
        # Left alone: a server that is not quarantined may be active in an application,
        # whose next write would then fail on the changed version.
        print(f"{_ident(kind, key)} is not quarantined; nothing changed", file=sys.stderr)
    return EXIT_OK


def _purge(args: argparse.Namespace) -> int:
    kind, key = args.kind, args.key
    try:
        record: Record | None = _load(args.directory, kind, key)
    except CommandError as exc:
        if exc.code != EXIT_NOT_FOUND or "no such record" in str(exc):
            raise
        record, unreadable = None, str(exc)  # a row that is not a valid record
    if record is None:
        question = f"Delete the unreadable row {_ident(kind, key)} ({unreadable})"
    else:
        question = (f"Delete {_ident(kind, key)} ({_status(record)}, version "
                    f"{record.version}, {len(record.data)} bytes)")
    if not args.yes:
        sys.stderr.write(f"{question} from {args.directory}? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise CommandError("nothing purged")
    # Only the version that was shown is deleted: a newer one is a conflict. An
    # unreadable row has no version: it is deleted unconditionally, without reading it.
    delete = Delete(kind, key, None if record is None else record.version)
    _session(_store(args.directory, write=True), lambda store: store.commit([delete]))
    if record is None:
        print(f"purged the unreadable row {_ident(kind, key)}")
    else:
        print(f"purged {_ident(kind, key)} (it was at version {record.version})")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    store = _store(args.directory)

    def export(out: IO[str], quiet: bool) -> tuple[int, int]:
        progress = _Progress("exported", quiet=quiet)

        def visit(record: Record) -> None:
            out.write(json.dumps(record_to_json(record)) + "\n")
            progress.step()

        skipped = _session(store, lambda opened: _each(opened, None, visit))
        progress.done()
        return progress.count, skipped

    if args.output is None:
        count, skipped = export(sys.stdout, quiet=sys.stdout.isatty())
    else:
        # Written aside and renamed at the end: a failed export leaves no partial file.
        path = Path(args.output)
        partial = path.with_name(path.name + ".part")
        try:
            with partial.open("w", encoding="utf-8") as out:
                count, skipped = export(out, quiet=False)
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise CommandError(f"cannot write {args.output}: {exc}") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    if skipped:
        raise CommandError(
            f"the export is incomplete: {skipped} unreadable row(s) skipped (see above); "
            f"{count} record(s) exported"
        )
    print(f"exported {count} record(s) from {args.directory}", file=sys.stderr)
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    store = _store(args.directory, create=True, write=True)
    if args.file in (None, "-"):
        records = _read_records(sys.stdin, "<stdin>")
    else:
        try:
            with open(args.file, encoding="utf-8") as lines:
                records = _read_records(lines, args.file)
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {args.file}: {exc}", EXIT_USAGE) from None
    replace, written = args.replace, 0

    async def import_(opened: DiskCacheStore) -> None:
        nonlocal written
        operations: list[Put] = []
        existing: list[str] = []
        progress = _Progress("checked", len(records))
        for record in records:
            current = await opened.load(record.kind, record.key)
            if current is None:
                operations.append(Put(record, 0))
            elif not replace:
                existing.append(_ident(record.kind, record.key))
            else:
                # Above the stored version, so that a running server holding the old
                # one fails its next write and reloads, instead of overwriting this.
                replacement = attrs.evolve(
                    record, version=max(record.version, current.version + 1),
                    epoch=max(record.epoch, current.epoch),
                )
                operations.append(Put(replacement, current.version))
            progress.step()
        progress.done()
        if existing:
            raise CommandError(
                f"{len(existing)} record(s) already in {args.directory} "
                f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
                "nothing was imported. Pass --replace to overwrite them."
            )
        progress = _Progress("imported", len(operations))
        for start in range(0, len(operations), IMPORT_BATCH):
            batch = operations[start : start + IMPORT_BATCH]
            await opened.commit(batch)
            written += len(batch)
            progress.step(len(batch))
        progress.done()

    try:
        _session(store, import_)
    except CommandError:
        if written:
            print(f"{written} of {len(records)} record(s) were imported before that",
                  file=sys.stderr)
        raise
    print(f"imported {len(records)} record(s) into {args.directory}")
    return EXIT_OK


# -- the parser -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-pgs",
        description="Inspect and repair the servers stored in a trio-pgs DiskCacheStore "
        "directory. Safe while an application has the store open (see docs/cli.md).",
        epilog="Exit status: 0 ok; 1 no such record, refused, or a conflict with another "
        "writer; 2 bad usage, or not a trio-pgs store.",
    )
    parser.add_argument("--version", action="version", version=f"trio-pgs {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str,
                ident: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("directory", metavar="DIRECTORY", help="the store's directory")
        if ident:
            sub.add_argument("kind", metavar="KIND", help="the server's kind")
            sub.add_argument("key", metavar="KEY", help="the server's key")
        sub.set_defaults(run=run)
        return sub

    command("list", _list, "One row per stored server.").add_argument(
        "--kind", help="only the servers of this kind"
    )
    command("show", _show, "Print a server's stored state as JSON (its metadata on "
            "stderr).", ident=True).add_argument(
        "--meta", action="store_true",
        help="print the whole record as JSON on stdout instead (as export writes it)",
    )
    command("stats", _stats, "Records, quarantined servers and bytes, per kind.")
    command("release", _release, "Lift a server's quarantine (and forget its crashes), "
            "like PersistentSupervisor.release.", ident=True)
    command("purge", _purge, "Delete a server's record.", ident=True).add_argument(
        "--yes", "-y", action="store_true", help="do not ask for confirmation"
    )
    command("export", _export, "Write every record as JSON lines.").add_argument(
        "--output", "-o", metavar="FILE", help="write to FILE instead of stdout"
    )
    importer = command("import", _import, "Add the records of an export to the store "
                       "(which is created if DIRECTORY is new or empty).")
    importer.add_argument("file", metavar="FILE", nargs="?",
                          help="the export to read (default: stdin)")
    importer.add_argument("--replace", action="store_true",
                          help="overwrite records that already exist")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-pgs`` command with *argv* (default: ``sys.argv[1:]``); return
    its exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        status: int = args.run(args)
    except CommandError as exc:
        print(f"trio-pgs: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `trio-pgs export DIR | head`: the output is cut short
        # Python would fail again flushing stdout at exit; point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_NOT_FOUND
    return status
