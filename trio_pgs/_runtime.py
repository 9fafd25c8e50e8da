"""A server's task: activations one after the other, until its entry ends."""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
import outcome
import trio

from ._activation import Activation, check_not_coroutine, persistence_error
from ._calls import current_handling
from ._encoding import DecodingError
from ._entry import (
    Entry,
    ErrorFactory,
    Next,
    StartRequest,
    Status,
    not_found,
    not_running,
    quarantined_error,
)
from ._errors import (
    ActivationFailed,
    AlreadyStarted,
    ConflictError,
    ServerCrashed,
    StateEncodingError,
)
from ._events import EventType
from ._ref import ServerRef
from ._store import Delete, Put, Record

logger = logging.getLogger("trio_pgs")


async def serve(entry: Entry) -> None:
    """The task of one entry: activations, one after the other, until it ends."""
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
        finally:
            if entry.status is not Status.ENDED:
                # Cancelled at shutdown past the grace period, or an internal error:
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
    """Load (or create, for `start`) the server's record and run `on_activate`."""
    sup, info, ref = entry.sup, entry.info, entry.ref
    start, entry.start = entry.start, None
    entry.status = Status.ACTIVATING
    try:
        record = await sup.store.load(ref.kind, ref.key)
    except Exception as exc:
        _activation_failed(entry, exc, start)
        return None
    server = info.cls()
    state: Any
    created = False
    if record is None and start is not None:
        try:
            state = await server.init(*start.args)
            check_not_coroutine(state, ref, "init")
            data = info.codec.encode(state, str(ref))
        except Exception as exc:
            sup.note_crash(ref, False, exc)
            error = exc if isinstance(exc, StateEncodingError) else ServerCrashed(
                f"{ref}: init() raised {exc!r}; nothing was stored"
            )
            if error is not exc:
                error.__cause__ = exc
            start.slot.set_error(error)
            entry.end(not_found(ref))
            return None
        record = Record(ref.kind, ref.key, data, 1, info.options.state_version,
                        updated_at=time.time())
        created = True
        try:
            await sup.writer.commit(Put(record, 0))
        except ConflictError:
            start.slot.set_error(_already_started(ref))
            start = None
            return await activate(entry)
        except Exception as exc:
            start.slot.set_error(persistence_error(ref, exc))
            entry.end(not_found(ref))
            return None
    elif record is None:
        entry.end(not_found(ref))
        return None
    else:
        if start is not None:
            start.slot.set_error(_already_started(ref))
            start = None
            if entry.mailbox_empty():
                # Nothing else asked for this server: a refused start leaves it dormant
                # (no on_activate runs for it).
                entry.end(not_found(ref))
                return None
        if record.quarantined:
            entry.end(quarantined_error(ref))
            return None
        try:
            state, migrated = info.codec.decode(record.data, record.state_version, str(ref))
            if migrated:  # commit the migrated state back, once
                data = info.codec.encode(state, str(ref))
                migrated_record = attrs.evolve(
                    record, data=data, version=record.version + 1,
                    state_version=info.options.state_version, updated_at=time.time(),
                )
                await sup.writer.commit(Put(migrated_record, record.version))
                record = migrated_record
                sup.counters.migrations += 1
        except Exception as exc:
            _activation_failed(entry, exc, None)
            return None
    activation = Activation(entry, server, state, record)
    server._activation = activation
    try:
        state = await server.on_activate(state)
        check_not_coroutine(state, ref, "on_activate")
    except Exception as exc:
        activation.close()
        if created:
            # start() is all or nothing: the record it just created is deleted again.
            try:
                await sup.writer.commit(Delete(ref.kind, ref.key, record.version))
            except Exception:
                logger.exception("%s: the record created by start() could not be "
                                 "deleted after on_activate failed", ref, extra=entry.extra)
        _activation_failed(entry, exc, start, created)
        return None
    activation.state = state
    sup.counters.activations += 1
    sup.emit(EventType.ACTIVATED, ref)
    entry.status = Status.ACTIVE
    entry.mark_activated()
    if start is not None:
        start.slot.set(outcome.Value(ref))
    logger.debug("%s activated (version %d)", ref, record.version, extra=entry.extra)
    return activation


def _activation_failed(
    entry: Entry, exc: Exception, start: StartRequest | None, created: bool = False
) -> None:
    ref = entry.ref
    entry.sup.note_crash(ref, False, exc)
    logger.error("%s: activation failed: %r", ref, exc, extra=entry.extra)

    detail = str(exc) if isinstance(exc, DecodingError) else f"{ref}: {exc!r}"
    outcome_ = (
        "Nothing was stored; fix on_activate and start it again" if created
        else "The record is kept as is; fix the cause (the code, a migration or the "
        "record) and call again"
    )

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
