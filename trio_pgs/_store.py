"""The store protocol: what trio-pgs needs from a place that keeps records."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from ._errors import ConflictError
from ._schedule import Due, StoredReminder, earliest


@attrs.frozen(kw_only=True)
class Record:
    """One stored server: its encoded state and the bookkeeping that travels with it.

    ``version`` grows by one with every committed write (the first is 1) and is what a
    conditional write checks. ``epoch`` is a fencing token: a store that serves several
    processes refuses a write whose epoch is older than the stored one. ``state_version``
    is the schema version of ``data``. ``crashes`` holds the wall-clock times of the
    server's recent crashes and ``quarantined`` whether it crashed too often, so that
    both survive a process restart. ``history`` holds earlier committed states, newest
    first, when the server class keeps any (``keep_history``). ``reminders`` are the
    server's durable reminders, sorted by name, committed with the state.
    """

    kind: str
    key: str
    data: bytes
    version: int = 1
    state_version: int = 1
    epoch: int = 0
    updated_at: float = 0.0
    crashes: tuple[float, ...] = ()
    quarantined: bool = False
    history: tuple[bytes, ...] = ()
    reminders: tuple[StoredReminder, ...] = ()


def _slot_setters(cls: type, names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The slots' own setters of the frozen attrs class *cls*, for its fields *names*
    in order: see `next_record`. Checked here, once: they must be every field and
    every slot (no cached hash), none with a converter, a validator or an on_setattr
    hook (which those setters skip)."""
    fields, wanted = attrs.fields(cls), names.split()
    if (
        [field.name for field in fields] != wanted
        or [slot for slot in cls.__dict__["__slots__"] if slot != "__weakref__"] != wanted
        or any(
            field.converter is not None or field.validator is not None
            or field.on_setattr not in (None, attrs.setters.NO_OP)
            for field in fields
        )
    ):
        raise TypeError(f"{cls.__name__}'s fields changed: update _slot_setters' callers")
    return tuple(cls.__dict__[name].__set__ for name in names.split())


# A persisted message builds one Record and one Put. attrs' frozen `__init__` sets
# every slot through `object.__setattr__` by name; the slots' own descriptors set them
# in less than half the time (3.3 against 1.4 us for a Record, here).
(_kind, _key, _data, _version, _state_version, _epoch, _updated_at, _crashes,
 _quarantined, _history, _reminders) = _slot_setters(
    Record, "kind key data version state_version epoch updated_at crashes quarantined "
    "history reminders")



#: The largest version or epoch a record may have: its writes and claims count up
#: from it, and a store keeps it in a signed 64-bit integer (at most 2**63 - 1). A
#: write PostgreSQL refuses for its number fails its whole batch statement, the other
#: servers' writes with it; below this bound a server has 2**32 writes of room, more
#: than it makes in decades. Stores refuse a stored row above it, and the CLI's import
#: a record above it.
MAX_COUNT = 2**63 - 2**32

def next_record(
    old: Record, data: bytes, state_version: int, keep_history: int,
    reminders: tuple[StoredReminder, ...],
) -> Record:
    """The record that follows *old* with the new state *data* and *reminders*,
    keeping the last *keep_history* states that differ from the one after them. The
    hot path: its slots set one by one (`attrs.evolve` costs four times as much,
    `Record(...)` twice)."""
    record: Record = object.__new__(Record)
    _kind(record, old.kind)
    _key(record, old.key)
    _data(record, data)
    _version(record, old.version + 1)
    _state_version(record, state_version)
    _epoch(record, old.epoch)
    _updated_at(record, time.time())
    _crashes(record, old.crashes)
    _quarantined(record, old.quarantined)
    # A commit of the same state (its reminders alone) adds nothing to the history.
    if not keep_history:
        _history(record, ())
    elif data == old.data:
        _history(record, old.history[:keep_history])
    else:
        _history(record, (old.data, *old.history)[:keep_history])
    _reminders(record, reminders)
    return record


def due_of(record: Record) -> float | None:
    """Where *record* stands in a store's due index: when its first reminder is due,
    or None (no reminders, or quarantined: it gets none until released)."""
    if record.quarantined or not record.reminders:
        return None
    return earliest(record.reminders)


def next_version(old: Record, **changes: Any) -> Record:
    """*old* with *changes* as the next version: the bookkeeping writes (crashes,
    quarantine, release, rollback, migration)."""
    return attrs.evolve(old, version=old.version + 1, updated_at=time.time(), **changes)


@attrs.frozen
class Put:
    """Write *record*, provided the stored version is *expected_version* (0: absent)."""

    record: Record
    expected_version: int


_put_record, _put_expected = _slot_setters(Put, "record expected_version")


def put(record: Record, expected_version: int) -> Put:
    """``Put(record, expected_version)``, built as `next_record` builds its record
    (the hot path: one per persisted message)."""
    operation: Put = object.__new__(Put)
    _put_record(operation, record)
    _put_expected(operation, expected_version)
    return operation


@attrs.frozen
class Delete:
    """Delete a record, provided the stored version is *expected_version* (None: any)
    and, when *epoch* is given, that no later claim took the record (fencing).

    A store keeps what it needs of a deleted record (a tombstone: its last version and
    epoch), so that a record created again under the same key continues them."""

    kind: str
    key: str
    expected_version: int | None = None
    epoch: int | None = None


@attrs.frozen(kw_only=True)
class Claim:
    """What `SupportsClaims.claim` returns: the stored record (None if there is none)
    carrying the new *epoch*, and the stored *version* (that of the record, or of its
    tombstone if it was deleted; 0 if the key never had one). An activation writes with
    this epoch; a record created now is version ``version + 1``, expected ``version``."""

    record: Record | None
    epoch: int
    version: int


Operation = Put | Delete


@runtime_checkable
class Store(Protocol):
    """What every store adapter provides. All methods are called from the trio thread.

    A store serves one open supervisor at a time. `commit` is atomic: either every
    operation of the batch is applied or none is, and a failed condition raises
    `ConflictError`. Blocking libraries must run on a thread of their own. A store may
    also offer the capabilities below (`SupportsKinds`, `SupportsReportingScan`,
    `SupportsClaims`); the supervisor uses each one it finds. Run
    `trio_pgs.testing.check_store` against an adapter to check it keeps this contract.
    """

    async def open(self) -> None:
        """Open the store; raise `PersistenceError` saying what is wrong if it cannot."""

    async def close(self) -> None:
        """Release the store's resources; data stays."""

    async def load(self, kind: str, key: str) -> Record | None:
        """Return the record of (*kind*, *key*), or None (never stored, or deleted)."""

    async def commit(self, operations: Sequence[Operation]) -> None:
        """Apply *operations* atomically, checking each one's expected version and
        epoch (`check_version` says how). A deleted record leaves a tombstone."""

    def scan(self, kind: str) -> AsyncIterator[Record]:
        """Iterate over every record of *kind*, in no particular order."""


@runtime_checkable
class SupportsKinds(Protocol):
    """A store that lists its kinds cheaply: used once at startup to log the stored
    kinds that no listed class serves."""

    async def kinds(self) -> set[str]:
        """Every kind with a stored record."""


#: Told of each row a scan skipped: its kind/key (as stored) and why.
OnSkip = Callable[[str, Exception], None]


@runtime_checkable
class SupportsReportingScan(Protocol):
    """A store whose scans report the rows they cannot read instead of failing."""

    def scan(self, kind: str, *, on_skip: OnSkip | None = None) -> AsyncIterator[Record]:
        """`Store.scan`, skipping unreadable rows and telling *on_skip* of each."""


@runtime_checkable
class SupportsClaims(Protocol):
    """A store that fences its writers: every activation claims its server first, and
    the store refuses a write carrying an older epoch (docs/stores.md, "Claims")."""

    async def claim(self, kind: str, key: str) -> Claim:
        """Raise the stored epoch of (*kind*, *key*) by one and return the `Claim`.
        Epochs and versions only grow, across deletes too. For a key with no record,
        nothing need be written: the first write of the claimed epoch creates it."""


@runtime_checkable
class SupportsCommitEach(Protocol):
    """A store whose batches need not be all or nothing: the group-commit writer gives
    it a batch of many servers' writes, and a conflict fails one server's write only.
    (Without it, the writer retries a failed batch one operation at a time.)"""

    async def commit_each(self, operations: Sequence[Operation]) -> list[ConflictError | None]:
        """Apply *operations* in one transaction, each on its own condition, in order:
        one that fails is not applied, and its `ConflictError` is returned at its
        index; so is every later operation on the same record. The others commit.
        Any other failure raises, and then none of them was applied (or, for
        `OutcomeUnknown`, nobody knows)."""


@runtime_checkable
class SupportsReminders(Protocol):
    """A store with a due index of reminders (docs/reminders.md): the supervisor asks
    it which dormant servers have reminders due, instead of keeping a timer for each.

    The index holds one entry per record whose `due_of` is not None, written in the
    same transaction as the record (a delete or tombstone removes it). A wrapper
    around another store may say it keeps no reminders after all with a
    ``keeps_reminders`` attribute that is False (see `keeps_reminders`)."""

    async def due(
        self, kinds: Sequence[str], *, after: Due | None = None, limit: int = 1000
    ) -> list[Due]:
        """The index entries of *kinds*, in order (earliest first, then kind and
        key), strictly after *after* if given, at most *limit* of them."""


def keeps_reminders(store: Store) -> bool:
    """Whether *store* keeps reminders: it has a due index, and does not say otherwise."""
    return isinstance(store, SupportsReminders) and getattr(store, "keeps_reminders", True)


@attrs.frozen(kw_only=True)
class Member:
    """One node of a supervisor name, as the store's membership table holds it.

    ``node`` is the node's id (fresh for every open supervisor) and ``incarnation`` a
    number that grows with every join of the name. ``address`` is where other nodes
    reach it (``host:port``; empty for a supervisor opened without ``cluster=``).
    ``expires_in`` is how many seconds its lease still runs, by the database's clock
    (negative once run out). ``leaving``: it is handing its servers off before it
    stops. ``active``: its active servers at its last renewal."""

    supervisor: str
    node: str
    incarnation: int
    address: str
    clustered: bool
    host: str
    pid: int
    started_at: float
    expires_in: float
    leaving: bool = False
    active: int = 0
    #: A cluster node's proof that it holds the cluster's secret (an HMAC of its
    #: name and node id): nodes with another secret refuse each other.
    proof: str = ""


@runtime_checkable
class SupportsMembership(Protocol):
    """A store that keeps the members of each supervisor name, with leases timed by
    the store's own clock (docs/cluster.md). Every supervisor on such a store is a
    member: the only one of its name, or a node of a cluster."""

    async def join(
        self, supervisor: str, node: str, *, address: str, clustered: bool, lease: float,
        host: str, pid: int, proof: str = "",
    ) -> int:
        """Add *node* to the members of *supervisor* with a lease of *lease* seconds
        and return its incarnation. Raise `PersistenceError` when the name is taken:
        a live member opened without a cluster, or this one opened without a cluster
        while the name has live members."""

    async def renew(
        self, supervisor: str, node: str, incarnation: int, *, lease: float, active: int,
        leaving: bool,
    ) -> tuple[Member, ...] | None:
        """Renew the lease of *node* and return the live members of *supervisor*
        (itself included); None when its lease had run out or it was removed: it is
        no member any more, and must join again."""

    async def leave(self, supervisor: str, node: str, incarnation: int) -> None:
        """Remove *node* from the members (a no-op if it is gone already)."""

    async def members(self, supervisor: str | None = None) -> tuple[Member, ...]:
        """The members of *supervisor* (of every name if None), live or not yet
        removed, ordered by name and node."""


def check_version(current: tuple[int, int] | None, operation: Operation) -> None:
    """Raise `ConflictError` unless *operation* may apply over the stored (version,
    epoch), which is that of the record or of its tombstone (None: never stored).

    A write is fenced off if it carries an epoch older than the stored one (a later
    claim took the record); its expected version must be the stored one.
    """
    if isinstance(operation, Put):
        kind, key = operation.record.kind, operation.record.key
        expected: int | None = operation.expected_version
        epoch: int | None = operation.record.epoch
    else:
        kind, key = operation.kind, operation.key
        expected, epoch = operation.expected_version, operation.epoch
    found = 0 if current is None else current[0]
    if current is not None and epoch is not None and epoch < current[1]:
        raise ConflictError(
            f"{kind}/{key}: write fenced off (epoch {epoch} is older than the stored "
            f"epoch {current[1]}); another activation owns it",
            fenced=True,
        )
    if expected is not None and expected != found:
        raise ConflictError(
            f"{kind}/{key}: expected stored version {expected}, found {found}; "
            "another writer changed it"
        )


def claimer(store: Store) -> Callable[[str, str], Awaitable[Claim]]:
    """How the runtime claims a server on *store*: its own `claim`, or for a store
    without claims a plain load (no fencing: the record's own epoch)."""
    if isinstance(store, SupportsClaims):
        return store.claim

    async def load_as_claim(kind: str, key: str) -> Claim:
        record = await store.load(kind, key)
        if record is None:
            return Claim(record=None, epoch=0, version=0)
        return Claim(record=record, epoch=record.epoch, version=record.version)

    return load_as_claim
