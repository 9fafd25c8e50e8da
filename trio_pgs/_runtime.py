"""A server's task: activations one after the other, until its entry ends.

Rule of this module: an activation begins here, in one of four ways (created by
`start`, refused, restored from its record, or failed), and only a restored or
created server runs; every way out answers whoever waits on the entry.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import outcome
import trio

from ._activation import Activation, check_not_coroutine, interruption_in, persistence_error
from ._calls import Handling, current_handling
from ._encoding import Codec, DecodingError
from ._entry import (
    Entry,
    Next,
    StartRequest,
    Status,
    not_found,
    not_owner,
    not_running,
    quarantined_error,
)
from ._errors import (
    ActivationFailed,
    AlreadyStarted,
    ConflictError,
    OutcomeUnknown,
    RequestError,
    ServerCrashed,
    StateEncodingError,
)
from ._events import EventType
from ._ledger import ErrorFactory
from ._ref import ServerRef
from ._reminding import Starting
from ._server import PersistentServer
from ._store import Claim, Delete, Put, Record, next_version

logger = logging.getLogger("trio_pgs")


@trio.lowlevel.enable_ki_protection
async def serve(entry: Entry) -> None:
    """The task of one entry: activations, one after the other, until it ends.

    Protected from KeyboardInterrupt (handlers included): trio delivers a Ctrl-C to the
    main task instead, whose exit from the supervisor's block shuts every server down
    in order. One raised by a handler itself is handled in `Activation._handle`."""
    current_handling.set(None)  # the task inherited its spawner's context
    start = entry.start  # answered by the first activation, or below
    internal: ErrorFactory | None = None
    with trio.CancelScope(shield=True) as entry.task_scope:
        try:
            while True:
                activation = await activate(entry)
                if activation is None:
                    return
                entry.activation = activation
                step = await activation.run()
                activation.close()
                if step is Next.END:
                    return
        except trio.Cancelled:
            raise
        except Exception as exc:
            logger.exception("%s: internal error in trio-pgs; the server is stopped "
                             "(its stored state is kept)", entry.ref, extra=entry.extra)
            internal = _internal_error(entry.ref, exc)
        except BaseException as exc:
            # From init, on_activate or terminate (a handler's is handled by its
            # activation): the whole supervisor shuts down, this server as if cut off.
            interruption = interruption_in(exc)
            if interruption is None:
                raise
            entry.host.interrupt(interruption)
        finally:
            if entry.status is not Status.ENDED:
                # Cancelled at shutdown past the deadline, or an internal error:
                # nobody waiting on this server may be left hanging.
                ending = not_running(entry.ref) if internal is None else internal
                if start is not None:
                    start.slot.set_error(ending())  # a no-op once it was answered
                if entry.activation is not None:
                    await entry.activation.cut_off(internal)
                entry.end(ending)


def _internal_error(ref: ServerRef, exc: Exception) -> ErrorFactory:
    def error() -> BaseException:
        failure = ServerCrashed(
            f"{ref}: internal error in trio-pgs ({exc!r}); the server was stopped and its "
            "stored state kept. Please report it; the next message activates it again"
        )
        failure.__cause__ = exc
        return failure

    return error


async def activate(entry: Entry) -> Activation | None:
    """Load (or create, for `start`) the server's record and run `on_activate`;
    None when there is nothing to run (the entry has ended)."""
    start, entry.start = entry.start, None
    entry.status = Status.ACTIVATING
    if not entry.host.owns(entry.ref):  # another cluster node serves it: sent there
        elsewhere = not_owner(entry.ref)
        if start is not None:
            start.slot.set_error(elsewhere())
        entry.end(elsewhere)
        return None
    try:
        # The claim fences off any earlier activation: its writes are refused now.
        claim = await entry.host.claim(entry.ref.kind, entry.ref.key)
    except Exception as exc:
        _activation_failed(entry, exc, start)
        return None
    record = claim.record
    server = entry.info.cls()
    if record is None and start is not None:
        created = await _create(entry, server, start, claim)
        if created is None:
            return None
        if created is _TAKEN:  # another start won the race: a plain activation
            return await activate(entry)
        return await _run_on_activate(entry, server, *created, start)
    if record is None:
        entry.end(not_found(entry.ref))
        return None
    if start is not None and _refuse_start(entry, start):
        return None
    restored = await _restore(entry, record)
    if restored is None:
        return None
    return await _run_on_activate(entry, server, *restored, None, created=False)


#: `_create` lost the race to another start: the record exists now.
_TAKEN: Any = object()


async def _create(
    entry: Entry, server: PersistentServer[Any], start: StartRequest, claim: Claim
) -> tuple[Any, Record] | None:
    """`start()`: run `init`, commit the first record. None: the start failed (its
    caller has been answered and the entry ended)."""
    ref, info = entry.ref, entry.info
    starting = server._activation = Starting(
        ref, entry.host.wall_offset, entry.host.reminders_kept
    )
    try:
        state = await _in_chain(entry, server.init(*start.args))
        check_not_coroutine(state, ref, "init")
        data = info.codec.encode(state, str(ref))
    except RequestError as exc:
        start.slot.set_error(exc)  # refused: nothing stored, not a crash
        entry.end(not_found(ref))
        return None
    except Exception as exc:
        entry.host.note_crash(ref, False, exc)
        error = exc if isinstance(exc, StateEncodingError) else ServerCrashed(
            f"{ref}: init() raised {exc!r}; nothing was stored"
        )
        if error is not exc:
            error.__cause__ = exc
        start.slot.set_error(error)
        entry.end(not_found(ref))
        return None
    # Versions and epochs continue those of a deleted record under the same key.
    record = Record(
        kind=ref.kind, key=ref.key, data=data, version=claim.version + 1,
        state_version=info.options.state_version, epoch=claim.epoch, updated_at=time.time(),
        reminders=starting.book.current,  # set by init: created with the server
    )
    try:
        await entry.host.writer.commit(Put(record, claim.version))
    except trio.Cancelled:  # cut off at shutdown while the store had it
        start.slot.set_error(OutcomeUnknown(
            f"{ref}: the supervisor shut down while start()'s first commit was with the "
            "store; the server may or may not exist. Call it (or start it again, which "
            "raises AlreadyStarted if it exists) to find out"
        ))
        raise
    except ConflictError:
        start.slot.set_error(_already_started(ref))
        return _TAKEN  # type: ignore[no-any-return]
    except Exception as exc:
        start.slot.set_error(persistence_error(ref, exc))
        entry.end(not_found(ref))
        return None
    return state, record


def _refuse_start(entry: Entry, start: StartRequest) -> bool:
    """`start()` of a key that has a record: refused. Returns whether the entry
    ended (nothing else asked for the server, so it stays dormant: no
    `on_activate` runs for a call that fails)."""
    start.slot.set_error(_already_started(entry.ref))
    if entry.mailbox_empty():
        # Kept on the entry as it ends: a refused start tried nothing, which the
        # reminders' task is told (it may have taken this entry for the server woken).
        entry.start = start
        entry.end(not_found(entry.ref))
        return True
    return False


async def _restore(entry: Entry, record: Record) -> tuple[Any, Record] | None:
    """Decode (and migrate, committing the migrated state once) a stored record."""
    ref, info = entry.ref, entry.info
    if record.quarantined:
        entry.end(quarantined_error(ref))
        return None
    try:
        state, migrated = info.codec.decode(record.data, record.state_version, str(ref))
        if migrated:
            data = info.codec.encode(state, str(ref))
            migrated_record = next_version(
                record, data=data, state_version=info.options.state_version,
                history=_migrated_history(info.codec, record, str(ref)),
            )
            await entry.host.writer.commit(Put(migrated_record, record.version))
            record = migrated_record
            entry.host.counters.migrations += 1
    except Exception as exc:
        _activation_failed(entry, exc, None)
        return None
    return state, record


def _migrated_history(codec: Codec, record: Record, where: str) -> tuple[bytes, ...]:
    """*record*'s earlier states, migrated as its state is: what `rollback` restores
    is then of the current shape. The first one that cannot be migrated is dropped
    with the older ones: a rollback never writes a state of an older shape under the
    current ``state_version``."""
    kept = []
    for data in record.history:
        try:
            state, _ = codec.decode(data, record.state_version, where)
            kept.append(codec.encode(state, where))
        except Exception:  # a user's migration or converter: whatever it raises
            logger.warning("%s: an earlier state (kept for rollback) could not be migrated; "
                           "it and the older ones are dropped", where)
            break
    return tuple(kept)


async def _run_on_activate(
    entry: Entry,
    server: PersistentServer[Any],
    state: Any,
    record: Record,
    start: StartRequest | None,
    created: bool = True,
) -> Activation | None:
    ref = entry.ref
    activation = Activation(entry, server, state, record)
    server._activation = activation
    try:
        state = await _in_chain(entry, server.on_activate(state))
        check_not_coroutine(state, ref, "on_activate")
    except Exception as exc:
        activation.close()
        deleted = created and await _delete_created(entry, record, start)
        _activation_failed(entry, exc, start, created, deleted)
        return None
    except BaseException:  # cut off at shutdown (a Cancelled, or a group of them)
        _cut_off_after_creating(ref, start, created)
        raise
    activation.state = state
    if activation.reminders is not record.reminders:  # on_activate set some
        try:
            await activation.commit_reminders()
        except BaseException:
            _cut_off_after_creating(ref, start, created)
            raise
    entry.host.counters.activations += 1
    entry.host.emit(EventType.ACTIVATED, ref)
    entry.status = Status.ACTIVE
    entry.mark_activated()
    if start is not None:
        start.slot.set(outcome.Value(ref))
    logger.debug("%s activated (version %d)", ref, record.version, extra=entry.extra)
    return activation


async def _delete_created(entry: Entry, record: Record, start: StartRequest | None) -> bool:
    """start() is all or nothing: the record it just created is deleted again, as
    on_activate failed. Whether it was (not: the caller hears that the server exists)."""
    ref = entry.ref
    try:
        await entry.host.writer.commit(Delete(ref.kind, ref.key, record.version, record.epoch))
    except Exception:
        logger.exception("%s: the record created by start() could not be deleted after "
                         "on_activate failed", ref, extra=entry.extra)
        return False
    except BaseException:  # cut off at shutdown
        _cut_off_after_creating(ref, start, True)
        raise
    return True


def _cut_off_after_creating(ref: ServerRef, start: StartRequest | None, created: bool) -> None:
    """A `start` whose server was created, cut off by the shutdown before it was
    active (in ``on_activate``, or committing the reminders it set): the record stays,
    and its caller hears that the server exists."""
    if created and start is not None:
        start.slot.set_error(OutcomeUnknown(
            f"{ref}: the server was created (its record committed), but the supervisor "
            "shut down before its activation was done (on_activate, or the commit of the "
            "reminders it set): it exists, dormant, and its next message activates it "
            "(start() again raises AlreadyStarted)"
        ))


async def _in_chain(entry: Entry, hook: Any) -> Any:
    """Await the coroutine of `init` or `on_activate` as part of the call chain: a
    server it calls that calls back is a cycle (`CallCycleError`), not a deadlock."""
    handling = Handling(entry.ref, (), entry.waiting_on)
    token = current_handling.set(handling)
    try:
        return await hook
    finally:
        handling.live = False
        current_handling.reset(token)


def _activation_failed(
    entry: Entry, exc: Exception, start: StartRequest | None, created: bool = False,
    deleted: bool = True,
) -> None:
    """*created*: by this `start`, whose record is *deleted* again, or not."""
    ref = entry.ref
    entry.host.note_crash(ref, False, exc)
    logger.error("%s: activation failed: %r", ref, exc, extra=entry.extra)

    detail = str(exc) if isinstance(exc, DecodingError) else f"{ref}: {exc!r}"
    if not created:
        outcome_ = ("The record is kept as is; fix the cause (the code, a migration or "
                    "the record) and call again")
    elif deleted:
        outcome_ = "Nothing was stored; fix on_activate and start it again"
    else:
        outcome_ = ("The record start() created could not be deleted: the server exists "
                    "(its next message activates it; start() again raises "
                    "AlreadyStarted). Fix on_activate")

    def error() -> BaseException:
        failure = ActivationFailed(f"{detail}. {outcome_}")
        failure.__cause__ = exc
        return failure

    if start is not None:
        start.slot.set_error(error())
    entry.end(error)


def _already_started(ref: ServerRef) -> AlreadyStarted:
    return AlreadyStarted(
        f"{ref} is already started; use its ref (error.ref) or pick another key", ref
    )
