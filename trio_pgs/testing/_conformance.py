"""`check_store`: the store contract as a test any adapter can run.

Rule of this module: every promise a store makes to the runtime (docs/stores.md) is
checked here, against the store's public methods only, and a failure names the
promise. Capabilities are checked when the store declares them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from .._errors import ConflictError
from .._schedule import Due, StoredReminder
from .._store import (
    Delete,
    Put,
    Record,
    Store,
    SupportsClaims,
    SupportsCommitEach,
    SupportsKinds,
    SupportsReminders,
    SupportsReportingScan,
)

MakeStore = Callable[[], Store | Awaitable[Store]]


async def check_store(make_store: MakeStore) -> None:
    """Check that the stores *make_store* returns keep the store contract.

    *make_store* returns a new, empty, unopened store each time it is called (it may
    be async). Each check opens one, uses it, and closes it; a broken promise raises
    `AssertionError` naming it. Like `trio.testing.check_two_way_stream`, run it from a
    trio test of your own adapter::

        async def test_my_store_keeps_the_contract(tmp_path):
            await trio_pgs.testing.check_store(lambda: MyStore(tmp_path / uuid4().hex))
    """
    for check in _CHECKS:
        store = make_store()
        if not isinstance(store, Store):
            store = await store
        await store.open()
        try:
            await _check_empty(store)
            await check(store)
        except AssertionError as exc:
            raise AssertionError(f"{store!r}: {check.__doc__}: {exc}") from exc
        finally:
            await store.close()


def _record(key: str, data: bytes = b"1", version: int = 1, **fields: Any) -> Record:
    return Record(kind="conformance", key=key, data=data, version=version, **fields)


async def _conflicts(store: Store, *operations: Put | Delete) -> bool:
    try:
        await store.commit(list(operations))
    except ConflictError:
        return True
    return False


async def _check_empty(store: Store) -> None:
    found = [record.key async for record in store.scan("conformance")]
    if found or await store.load("conformance", "a") is not None:
        raise AssertionError(
            f"make_store() returned a store that is not empty (it holds {found}): it must "
            "return a new, empty store each time (a new directory, a new schema...)"
        )


async def _second_open_refused(store: Store) -> None:
    """a second open while the store is open raises ValueError"""
    try:
        await store.open()
    except ValueError:
        return
    raise AssertionError("it opened again")


async def _distinct_names(store: Store) -> None:
    """kinds and keys are kept apart whatever characters they hold"""
    names = [
        ("conformance", "a/b"), ("conformance/a", "b"), ("conformance", "a\x1fb"),
        ("conformance", "a:b"), ("conformance:a", "b"), ("conformance", "tombstone"),
        ("conformance", " a"), ("conformance", "\u202ea"), ("conformance", "é" * 200),
    ]
    await store.commit([
        Put(Record(kind=kind, key=key, data=repr((kind, key)).encode()), 0)
        for kind, key in names
    ])
    for kind, key in names:
        record = await store.load(kind, key)
        assert record is not None and record.data == repr((kind, key)).encode(), (kind, key)
    keys = sorted([record.key async for record in store.scan("conformance")])
    assert keys == sorted(key for kind, key in names if kind == "conformance"), keys


async def _tombstones_fence(store: Store) -> None:
    """a deleted record keeps its epoch: a writer left behind cannot bring it back"""
    await store.commit([Put(_record("a", epoch=1), 0)])
    await store.commit([Put(_record("a", b"2", 2, epoch=2), 1)])  # a newer owner
    await store.commit([Delete("conformance", "a", 2, epoch=2)])
    assert await _conflicts(store, Put(_record("a", b"stale", 3, epoch=1), 2)), (
        "a write with an older epoch than the deleted record's was accepted"
    )
    await store.commit([Put(_record("b", epoch=7), 0)])
    await store.commit([Delete("conformance", "b")])  # a purge: no version, no epoch
    assert await _conflicts(store, Put(_record("b", b"stale", 2, epoch=6), 1)), (
        "a purge forgot the record's epoch"
    )


async def _missing_is_none(store: Store) -> None:
    """load of a key never stored returns None"""
    assert await store.load("conformance", "missing") is None


async def _round_trip(store: Store) -> None:
    """a record reads back as it was written, every field"""
    record = _record(
        "a", b'{"x": [1, 2]}', 1, state_version=3, epoch=0, updated_at=123.5,
        crashes=(1.0, 2.5), quarantined=True, history=(b"old", b"older"),
        reminders=(StoredReminder("a", 1.5e9, None, '{"x":[1]}'),
                   StoredReminder("b", 2.25e9, 60.0, "null")),
    )
    await store.commit([Put(record, 0)])
    assert await store.load("conformance", "a") == record


async def _conditional_put(store: Store) -> None:
    """a put expecting another version is a ConflictError and changes nothing"""
    await store.commit([Put(_record("a"), 0)])
    assert await _conflicts(store, Put(_record("a", b"2", 2), 5)), "accepted"
    assert await _conflicts(store, Put(_record("a", b"2", 2), 0)), "created twice"
    stored = await store.load("conformance", "a")
    assert stored is not None and stored.data == b"1", f"changed to {stored}"


async def _atomic_batch(store: Store) -> None:
    """a batch with one failed condition applies none of its operations"""
    await store.commit([Put(_record("a"), 0)])
    batch = [Put(_record("b"), 0), Put(_record("a", b"2", 2), 7)]
    assert await _conflicts(store, *batch), "accepted"
    assert await store.load("conformance", "b") is None, "half a batch was applied"


async def _batch_in_order(store: Store) -> None:
    """a batch may write one record twice, each write checked against the one before"""
    await store.commit([Put(_record("a"), 0), Put(_record("a", b"2", 2), 1)])
    stored = await store.load("conformance", "a")
    assert stored is not None and stored.version == 2


async def _conditional_delete(store: Store) -> None:
    """a delete checks its expected version; an unconditional one always applies"""
    await store.commit([Put(_record("a"), 0), Put(_record("b"), 0)])
    assert await _conflicts(store, Delete("conformance", "a", 9)), "accepted"
    await store.commit([Delete("conformance", "a", 1), Delete("conformance", "b")])
    assert await store.load("conformance", "a") is None
    assert await store.load("conformance", "b") is None


async def _versions_continue_after_delete(store: Store) -> None:
    """a deleted record's versions are not reused: a new one continues them"""
    await store.commit([Put(_record("a"), 0), Put(_record("a", b"2", 2), 1)])
    await store.commit([Delete("conformance", "a", 2)])
    assert await _conflicts(store, Put(_record("a", b"new", 1), 0)), (
        "a record was created again at version 1 after a delete (a writer left behind "
        "could then write over it)"
    )
    await store.commit([Put(_record("a", b"new", 3), 2)])
    stored = await store.load("conformance", "a")
    assert stored is not None and stored.version == 3


async def _scan_by_kind(store: Store) -> None:
    """scan yields exactly the records of its kind, deleted ones excluded"""
    await store.commit([
        Put(_record("a"), 0), Put(_record("b"), 0), Put(_record("c"), 0),
        Put(Record(kind="conformance.other", key="a", data=b"1"), 0),
    ])
    await store.commit([Delete("conformance", "c")])
    keys = sorted([record.key async for record in store.scan("conformance")])
    assert keys == ["a", "b"], keys


async def _fencing(store: Store) -> None:
    """a write or delete carrying an older epoch than the stored one is refused"""
    await store.commit([Put(_record("a", epoch=5), 0)])
    assert await _conflicts(store, Put(_record("a", b"2", 2, epoch=4), 1)), "put accepted"
    assert await _conflicts(store, Delete("conformance", "a", 1, epoch=4)), "delete accepted"
    await store.commit([Put(_record("a", b"2", 2, epoch=5), 1)])


async def _claims(store: Store) -> None:
    """a claim raises the epoch, fences the writer before it, and survives deletes"""
    if not isinstance(store, SupportsClaims):
        return
    absent = await store.claim("conformance", "a")
    assert absent.record is None and absent.version == 0, absent
    first = _record("a", epoch=absent.epoch)
    await store.commit([Put(first, 0)])
    claim = await store.claim("conformance", "a")
    assert claim.record is not None and claim.epoch > absent.epoch, claim
    assert claim.record.epoch == claim.epoch and claim.version == 1, claim
    assert attrs.evolve(claim.record, epoch=first.epoch) == first, "the claim changed data"
    assert await _conflicts(store, Put(_record("a", b"2", 2, epoch=first.epoch), 1)), (
        "a write of the activation before the claim was accepted"
    )
    await store.commit([Put(_record("a", b"2", 2, epoch=claim.epoch), 1)])
    await store.commit([Delete("conformance", "a", 2, claim.epoch)])
    again = await store.claim("conformance", "a")
    assert again.record is None and again.version == 2, again
    assert again.epoch > claim.epoch, f"epoch {again.epoch} repeats after a delete"


async def _kinds(store: Store) -> None:
    """kinds lists every kind with a stored record, and no other"""
    if not isinstance(store, SupportsKinds):
        return
    await store.commit([
        Put(_record("a"), 0), Put(Record(kind="conformance.other", key="a", data=b"1"), 0),
        Put(Record(kind="conformance.gone", key="a", data=b"1"), 0),
    ])
    await store.commit([Delete("conformance.gone", "a")])
    kinds = await store.kinds()
    assert kinds == {"conformance", "conformance.other"}, kinds


async def _reporting_scan(store: Store) -> None:
    """a reporting scan yields every readable record and reports nothing on clean data"""
    if not isinstance(store, SupportsReportingScan):
        return
    await store.commit([Put(_record("a"), 0)])
    skipped: list[str] = []
    keys = [r.key async for r in store.scan("conformance", on_skip=lambda k, e: skipped.append(k))]
    assert keys == ["a"] and skipped == [], (keys, skipped)


async def _commit_each(store: Store) -> None:
    """commit_each refuses a conflicting operation, and later ones on its record, only"""
    if not isinstance(store, SupportsCommitEach):
        return
    await store.commit([Put(_record("a"), 0), Put(_record("b"), 0)])
    outcomes = await store.commit_each([
        Put(_record("a", b"2", 2), 1),
        Put(_record("b", b"x", 5), 4),  # b is at version 1: refused
        Put(_record("c"), 0),
        Put(_record("b", b"y", 6), 5),  # follows the refused write: refused too
        Put(_record("a", b"3", 3), 2),  # follows a write of the same batch
        Delete("conformance", "never-stored"),
    ])
    refused = [index for index, outcome in enumerate(outcomes) if outcome is not None]
    assert len(outcomes) == 6 and refused == [1, 3], outcomes
    assert all(isinstance(outcomes[index], ConflictError) for index in refused), outcomes
    found = {key: await store.load("conformance", key) for key in "abc"}
    data = {key: None if r is None else (r.data, r.version) for key, r in found.items()}
    assert data == {"a": (b"3", 3), "b": (b"1", 1), "c": (b"1", 1)}, data


def _reminding(key: str, *dues: float, kind: str = "conformance", **fields: Any) -> Record:
    reminders = tuple(StoredReminder(f"r{n}", due) for n, due in enumerate(dues))
    return Record(kind=kind, key=key, data=b"1", reminders=reminders, **fields)


async def _due_index(store: Store) -> None:
    """the due index lists each record with reminders at its earliest, in order, by kind"""
    if not isinstance(store, SupportsReminders):
        return
    await store.commit([
        Put(_reminding("a", 30.0, 10.0), 0), Put(_reminding("b", 20.0), 0),
        Put(_reminding("c"), 0), Put(_reminding("d", 10.0), 0),
        Put(_reminding("q", 5.0, quarantined=True), 0),
        Put(_reminding("a", 1.0, kind="conformance.other"), 0),
    ])
    due = await store.due(["conformance"])
    assert due == [Due(10.0, "conformance", "a"), Due(10.0, "conformance", "d"),
                   Due(20.0, "conformance", "b")], due
    both = await store.due(["conformance", "conformance.other"], limit=2)
    assert both == [Due(1.0, "conformance.other", "a"), Due(10.0, "conformance", "a")], both
    page = await store.due(["conformance"], after=Due(10.0, "conformance", "a"), limit=1)
    assert page == [Due(10.0, "conformance", "d")], page
    assert await store.due(["nothing"]) == [], "a kind with no records has entries"


async def _due_index_follows_commits(store: Store) -> None:
    """the due index changes with each committed put and delete, and not with a refused one"""
    if not isinstance(store, SupportsReminders):
        return
    await store.commit([Put(_reminding("a", 10.0), 0), Put(_reminding("b", 20.0), 0)])
    await store.commit([Put(attrs.evolve(_reminding("a", 30.0), version=2), 1)])
    assert await _conflicts(store, Put(attrs.evolve(_reminding("b", 1.0), version=9), 8))
    await store.commit([Delete("conformance", "b", 1)])
    assert await store.due(["conformance"]) == [Due(30.0, "conformance", "a")]
    await store.commit([Put(attrs.evolve(_reminding("a"), version=3), 2)])
    assert await store.due(["conformance"]) == [], "a record without reminders is listed"
    await store.commit([Put(attrs.evolve(_reminding("a", 7.0), version=4), 3)])
    await store.commit([
        Put(attrs.evolve(_reminding("a", 7.0), version=5, quarantined=True), 4)
    ])
    assert await store.due(["conformance"]) == [], "a quarantined record is listed"
    await store.commit([Put(attrs.evolve(_reminding("a", 7.0), version=6), 5)])
    assert await store.due(["conformance"]) == [Due(7.0, "conformance", "a")]
    if isinstance(store, SupportsCommitEach):
        outcomes = await store.commit_each([
            Put(attrs.evolve(_reminding("a", 8.0), version=9), 8),
            Put(_reminding("n", 3.0), 0),
        ])
        assert outcomes[0] is not None and outcomes[1] is None, outcomes
        due = await store.due(["conformance"])
        assert due == [Due(3.0, "conformance", "n"), Due(7.0, "conformance", "a")], due


_CHECKS = (
    _missing_is_none, _round_trip, _conditional_put, _atomic_batch, _batch_in_order,
    _conditional_delete, _versions_continue_after_delete, _scan_by_kind, _fencing,
    _tombstones_fence, _distinct_names, _second_open_refused, _claims, _kinds,
    _reporting_scan, _commit_each, _due_index, _due_index_follows_commits,
)
