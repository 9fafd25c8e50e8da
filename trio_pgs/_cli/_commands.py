"""The commands of ``trio-pgs``: list, show, stats, release, purge, export, import,
nodes."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import IO

import attrs

from .._errors import PersistenceError
from .._schedule import StoredReminder
from .._store import (
    Claim,
    Delete,
    Member,
    Put,
    Record,
    SupportsMembership,
    claimer,
    next_version,
)
from ._exchange import import_refusal, read_records, record_to_json
from ._exit import EXIT_NOT_STARTED, EXIT_OK, CommandError
from ._opener import CommandStore, check_storable, session, shown, store_from_spec
from ._output import (
    Progress,
    err,
    err_json,
    escape,
    from_now,
    ident,
    iso,
    json_text,
    out,
    span,
    status,
    table,
)

#: How much of a reminder's payload `show` prints (``--meta`` prints it whole).
SHOWN_PAYLOAD = 200
#: Records per transaction on import: a bound on what one SQLite transaction holds
#: (and on what an interrupted import leaves half done: whole batches only).
IMPORT_BATCH = 500


async def _each(store: CommandStore, kind: str | None, visit: Callable[[Record], None]) -> int:
    """Call *visit* with every record (of *kind*), by kind then key; print each row
    that is not a valid record, and return how many were skipped."""
    skipped = 0

    def report(kind: str, key: str, error: Exception) -> None:
        nonlocal skipped
        skipped += 1
        err(f"trio-pgs: scan skipped {kind}/{key}: {error}")

    for each in [kind] if kind is not None else sorted(await store.kinds()):
        rows = store.scan(each, on_skip=functools.partial(report, each))
        try:
            async for record in rows:
                visit(record)
        finally:
            if isinstance(rows, AsyncGenerator):  # closed now, not when collected
                await rows.aclose()
    return skipped


def _load(spec: str, kind: str, key: str) -> Record:
    record = session(store_from_spec(spec, write=False), lambda store: store.load(kind, key))
    if record is None:
        raise CommandError(f"{ident(kind, key)}: no such record in {shown(spec)}")
    return record


def list_command(args: argparse.Namespace) -> int:
    rows: list[tuple[object, ...]] = []

    def visit(r: Record) -> None:
        rows.append((r.kind, r.key, status(r), r.version, r.state_version,
                     iso(r.updated_at), len(r.data)))

    session(store_from_spec(args.store, write=False),
            lambda store: _each(store, args.kind, visit))
    header = ("KIND", "KEY", "STATUS", "VERSION", "STATE_VERSION", "UPDATED", "SIZE")
    table(header, rows, numeric={3, 4, 6})
    return EXIT_OK


def show_command(args: argparse.Namespace) -> int:
    record = _load(args.store, args.kind, args.key)
    exported = record_to_json(record)
    if args.meta:
        try:
            print(json_text(exported, indent=2))
        except ValueError:
            raise CommandError(
                f"{ident(record.kind, record.key)} holds a time that JSON cannot hold (NaN "
                "or infinite); show it without --meta"
            ) from None
        return EXIT_OK
    crashes = ", ".join(map(iso, record.crashes))
    for name, value in [
        ("record", ident(record.kind, record.key)),
        ("status", status(record)),
        ("version", record.version),
        ("state_version", record.state_version),
        ("epoch", record.epoch),
        ("updated", iso(record.updated_at)),
        ("crashes", f"{len(record.crashes)}" + (f" ({crashes})" if crashes else "")),
        ("history", f"{len(record.history)} earlier state(s)"),
        ("size", f"{len(record.data)} bytes"),
    ]:
        err(f"{name + ':':<15}{value}")
    _show_reminders(record, time.time())
    if escape(ident(record.kind, record.key)) != ident(record.kind, record.key):
        err("(the record's name is shown escaped: --meta prints its kind and key exactly, "
            "as JSON)")
    if "data" in exported:
        print(json_text(exported["data"], indent=2))
    else:
        err("the state is not JSON; here are its bytes in base64:")
        print(exported["data_base64"])
    return EXIT_OK


def _show_reminders(record: Record, now: float) -> None:
    """The reminders of *record*, one line each on stderr: name, when next due (and how
    far from *now*), period, payload (as JSON, cut short past `SHOWN_PAYLOAD`)."""
    held = " (none is delivered while the server is quarantined)" if (
        record.quarantined and record.reminders) else ""
    err(f"{'reminders:':<15}{len(record.reminders)}{held}")
    for reminder in record.reminders:
        pad = " " * max(1, 12 - len(escape(reminder.name)))  # as printed
        line = (f"  {reminder.name}:{pad}next due {iso(reminder.due, zero=None)}, "
                f"{from_now(reminder.due, now)}; ")
        if reminder.every is not None:
            line += f"every {span(reminder.every, exact=True)}; "
        _err_payload(line + "payload ", reminder)
    if any(escape(reminder.name) != reminder.name for reminder in record.reminders):
        err("(a reminder's name is shown escaped: --meta prints it exactly, as JSON)")


def _err_payload(text: str, reminder: StoredReminder) -> None:
    """*text*, then *reminder*'s payload as JSON (its text escaped, if it is none)."""
    try:
        err_json(text, json.loads(reminder.payload), limit=SHOWN_PAYLOAD)
    except (ValueError, RecursionError):  # a row written behind the store's back: NaN...
        err(f"{text}{reminder.payload} (not JSON)")


def stats_command(args: argparse.Namespace) -> int:
    kinds: dict[str, list[int]] = {}

    def visit(record: Record) -> None:
        counts = kinds.setdefault(record.kind, [0, 0, 0])
        counts[0] += 1
        counts[1] += record.quarantined
        counts[2] += len(record.data) + sum(map(len, record.history))

    session(store_from_spec(args.store, write=False), lambda store: _each(store, None, visit))
    total = [sum(counts[column] for counts in kinds.values()) for column in range(3)]
    rows = [(kind, *counts) for kind, counts in sorted(kinds.items())]
    table(("KIND", "RECORDS", "QUARANTINED", "BYTES"), [*rows, ("(total)", *total)],
           numeric={1, 2, 3})
    return EXIT_OK


def nodes_command(args: argparse.Namespace) -> int:
    async def members(store: CommandStore) -> tuple[Member, ...] | None:
        if not isinstance(store, SupportsMembership):
            return None
        return await store.members(args.supervisor)

    found = session(store_from_spec(args.store, write=False), members)
    if found is None:
        # Opened all the same: a directory that is no store is refused as elsewhere.
        err(f"{shown(args.store)} has no nodes: a DiskCacheStore directory serves one "
            "process and keeps no membership (clusters need a PostgresStore)")
        return EXIT_OK
    rows = [(m.supervisor, m.node, m.incarnation, _address(m), m.host, m.pid,
             _lease_left(m), "yes" if m.leaving else "no", m.active) for m in found]
    header = ("SUPERVISOR", "NODE", "INCARNATION", "ADDRESS", "HOST", "PID", "LEASE",
              "LEAVING", "ACTIVE")
    table(header, rows, numeric={2, 5, 6, 8})
    if not rows and args.supervisor is None:
        err(f"no supervisor is open on {shown(args.store)}")
    elif not rows:
        err(f"supervisor {args.supervisor!r} has no node open on {shown(args.store)}")
    return EXIT_OK


def _address(member: Member) -> str:
    if not member.clustered:
        return "(no cluster)"
    return member.address or "-"


def _lease_left(member: Member) -> str:
    """Seconds left by the database's clock when it was read; a lease that ran out is
    kept until the next join of its name removes it."""
    return f"{member.expires_in:.1f}" if member.expires_in > 0 else "expired"


def release_command(args: argparse.Namespace) -> int:
    kind, key = args.kind, args.key

    async def release(store: CommandStore) -> tuple[Record | None, bool]:
        record = await store.load(kind, key)
        if record is None or not record.quarantined:
            return record, False
        released = next_version(record, quarantined=False, crashes=())
        await store.commit([Put(released, record.version)])
        return released, True

    record, released = session(store_from_spec(args.store, write=True), release)
    if record is None:
        raise CommandError(f"{ident(kind, key)}: no such record in {shown(args.store)}")
    if released:
        out(f"released {ident(kind, key)} (now at version {record.version})")
    else:
        # Left alone: a server that is not quarantined may be active in an application,
        # whose next write would then fail on the changed version.
        err(f"{ident(kind, key)} is not quarantined; nothing changed")
    return EXIT_OK


def purge_command(args: argparse.Namespace) -> int:
    kind, key = args.kind, args.key

    async def look(store: CommandStore) -> tuple[Record | None, str | None]:
        try:
            return await store.load(kind, key), None
        except PersistenceError as exc:  # a row that is not a valid record
            return None, str(exc)

    # Opened for writing from the start: a store that cannot be written (in use by an
    # application) is refused before the question, not after the answer.
    record, unreadable = session(store_from_spec(args.store, write=True), look)
    if record is None and unreadable is None:
        raise CommandError(f"{ident(kind, key)}: no such record in {shown(args.store)}")
    if record is None:
        question = f"Delete the unreadable row {ident(kind, key)} ({unreadable})"
    else:
        question = (f"Delete {ident(kind, key)} ({status(record)}, version "
                    f"{record.version}, {len(record.data)} bytes)")
    if not args.yes:
        sys.stderr.write(escape(f"{question} from {shown(args.store)}? ") + "[y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise CommandError("nothing purged")
    # Only the version that was shown is deleted: a newer one is a conflict. An
    # unreadable row has no version: it is deleted unconditionally, without reading it.
    session(store_from_spec(args.store, write=True), lambda store: _purge(store, kind, key, record))
    if record is None:
        out(f"purged the unreadable row {ident(kind, key)}")
    else:
        out(f"purged {ident(kind, key)} (it was at version {record.version})")
    return EXIT_OK


async def _purge(store: CommandStore, kind: str, key: str, record: Record | None) -> None:
    """Delete the record shown, fenced: on a store with claims, claim it first, so that
    an activation of it running elsewhere (on a shared database) cannot write the
    record back after the delete; it stops at its next write."""
    if record is None:  # an unreadable row: deleted unconditionally, never read
        await store.commit([Delete(kind, key)])
        return
    claim = await claimer(store)(kind, key)
    await store.commit([Delete(kind, key, record.version, claim.epoch)])


def export_command(args: argparse.Namespace) -> int:
    store = store_from_spec(args.store, write=False)
    refused = 0

    def export(output: IO[str], quiet: bool) -> tuple[int, int]:
        progress = Progress("exported", quiet=quiet)

        def visit(record: Record) -> None:
            nonlocal refused
            exported = record_to_json(record)
            refusal = import_refusal(record, exported)
            if refusal is not None:  # every export imports back: leave it out, and say so
                refused += 1
                err(f"trio-pgs: export skipped {ident(record.kind, record.key)}: {refusal}")
                return
            output.write(json_text(exported, ascii=True) + "\n")
            progress.step()

        unreadable = session(store, lambda opened: _each(opened, None, visit))
        progress.done()
        return progress.count, unreadable

    if args.output is None:
        count, unreadable = export(sys.stdout, quiet=sys.stdout.isatty())
    else:
        # Written aside and renamed at the end: a failed export leaves no partial file.
        path = Path(args.output)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise CommandError(
                f"{args.output} is not a regular file (a link, a directory, a device, a "
                "pipe); export writes a new file and renames it there: give another path, "
                "or write to stdout", EXIT_NOT_STARTED,
            )
        try:  # a name of its own: never another file's
            handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                            suffix=".part")
        except OSError as exc:
            raise CommandError(f"cannot write {args.output}: {exc}") from None
        partial = Path(name)
        try:
            with open(handle, "w", encoding="utf-8") as output:
                count, unreadable = export(output, quiet=False)
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise CommandError(f"cannot write {args.output}: {exc}") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    left_out = [f"{unreadable} unreadable row(s)"] if unreadable else []
    left_out += [f"{refused} record(s) that an import would refuse"] if refused else []
    if left_out:
        raise CommandError(
            f"the export is incomplete: {' and '.join(left_out)} skipped (see above); "
            f"{count} record(s) exported"
        )
    err(f"exported {count} record(s) from {shown(args.store)}")
    return EXIT_OK


def import_command(args: argparse.Namespace) -> int:
    store = store_from_spec(args.store, write=True, create=True)
    source = "<stdin>" if args.file in (None, "-") else args.file
    if source == "<stdin>":
        try:
            records = read_records(sys.stdin, source)
        except UnicodeDecodeError as exc:
            raise CommandError(f"cannot read {source}: {exc}", EXIT_NOT_STARTED) from None
    else:
        try:
            with open(source, encoding="utf-8") as lines:
                records = read_records(lines, source)
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {source}: {exc}", EXIT_NOT_STARTED) from None
    if not records and not args.allow_empty:
        # Most likely a backup that went wrong: restoring "nothing" deserves a word.
        raise CommandError(
            f"{source} holds no records; nothing was imported. Pass --allow-empty to "
            "import it all the same (into a new directory, that makes an empty store)"
        )
    check_storable(store, records, source)
    written = sending = 0

    async def import_(opened: CommandStore) -> None:
        nonlocal written, sending
        if not args.replace:
            await _refuse_stored(opened, records, shown(args.store))
        operations = await _imports(opened, records)
        progress = Progress("imported", len(operations))
        for start in range(0, len(operations), IMPORT_BATCH):
            batch = operations[start : start + IMPORT_BATCH]
            sending = len(batch)
            await opened.commit(batch)
            written, sending = written + len(batch), 0
            progress.step(len(batch))
        progress.done()

    try:
        session(store, import_)
    except (CommandError, KeyboardInterrupt):
        if written or sending:
            maybe = (f", and the {sending} of the batch being written may have been "
                     "too (the store has it whole or not at all)") if sending else ""
            err(f"{written} of {len(records)} record(s) were imported before that{maybe}")
        raise
    out(f"imported {len(records)} record(s) into {shown(args.store)}")
    return EXIT_OK


async def _refuse_stored(store: CommandStore, records: list[Record], spec: str) -> None:
    """Refuse the import if any of *records* is stored already (it would replace it)."""
    stored: list[str] = []
    progress = Progress("checked", len(records))
    for record in records:
        if await store.load(record.kind, record.key) is not None:
            stored.append(ident(record.kind, record.key))
        progress.step()
    progress.done()
    if stored:
        raise CommandError(
            f"{len(stored)} record(s) already in {spec} "
            f"({', '.join(stored[:3])}{', ...' if len(stored) > 3 else ''}); "
            "nothing was imported. Pass --replace to overwrite them."
        )


async def _imports(store: CommandStore, records: list[Record]) -> list[Put]:
    """The writes that import *records*: each claims its key first, so that it learns
    the stored version, a deleted record's included (see `_import`)."""
    claim = claimer(store)
    operations: list[Put] = []
    progress = Progress("claimed", len(records))
    for record in records:
        operations.append(_import(record, await claim(record.kind, record.key)))
        progress.step()
    progress.done()
    return operations


def _import(record: Record, claim: Claim) -> Put:
    """The write of *record* over what *claim* found: the record as it is where its key
    never had one (a restore into a new store is exact), else above the stored version
    (or the deleted record's) at the claimed epoch, so that versions never repeat and a
    server still holding the old record fails its next write instead of overwriting
    this one."""
    if claim.record is None and claim.version == 0:
        return Put(record, 0)
    imported = attrs.evolve(
        record, version=max(record.version, claim.version + 1),
        epoch=max(record.epoch, claim.epoch),
    )
    return Put(imported, claim.version)
