"""One activation of a server: its message loop, commits, crashes, stops, hibernation."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import attrs
import outcome
import trio

from ._calls import Caller, Handling, Kind, Message, current_handling
from ._entry import (
    Entry,
    ErrorFactory,
    Next,
    Status,
    not_found,
    not_running,
    quarantined_error,
)
from ._errors import (
    ConflictError,
    PersistenceError,
    ServerCrashed,
    SimulatedCrash,
    StateEncodingError,
    SupervisorNotRunning,
)
from ._events import EventType
from ._results import NO_REPLY, NoReply, Reply, Stop
from ._server import Persistence, PersistentServer, Restart
from ._store import Delete, Put, Record

if TYPE_CHECKING:
    from ._ref import ServerRef

logger = logging.getLogger("trio_pgs")


class Activation:
    """A server instance running on an entry, from `on_activate` to its end."""

    __slots__ = (
        "closed", "conflicted", "current", "entry", "flush_at", "gated", "handling",
        "idle_timeout", "inflight", "lag", "owed", "pending", "reaper", "record", "server",
        "state", "timers",
    )

    def __init__(
        self, entry: Entry, server: PersistentServer[Any], state: Any, record: Record
    ) -> None:
        self.entry = entry
        self.server = server
        self.state = state
        self.record = record  # the last committed record
        options = entry.info.options
        #: WRITE_BEHIND and ON_STOP: the newest encoded state not committed yet, and
        #: when it must be (never sooner than needed; inf for ON_STOP).
        self.pending: bytes | None = None
        self.flush_at = math.inf
        self.lag = (
            None if options.persistence is Persistence.EACH_MESSAGE
            else options.max_lag if options.persistence is Persistence.WRITE_BEHIND
            else math.inf
        )
        self.idle_timeout = options.idle_timeout
        self.reaper = entry.sup.reaper
        self.handling = False
        self.gated: list[tuple[Caller, outcome.Outcome[Any]]] = []
        # Dicts used as ordered sets: an empty dict is a third of an empty set.
        self.owed: dict[Caller, None] = {}
        self.timers: dict[trio.CancelScope, None] = {}
        self.closed = False
        #: A deferred write met this ConflictError: this activation's record is stale.
        self.conflicted: ConflictError | None = None
        #: The message being handled (or last handled): its caller is answered if the
        #: handler is cut off at shutdown.
        self.current: Message | None = None
        #: EACH_MESSAGE: the commit handed to the writer and not yet settled (see
        #: _hand_off): its outcome is awaited before anything else happens.
        self.inflight: _Inflight | None = None
        self._touch()  # activated now: the idle deadline starts

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> Next:
        entry = self.entry
        receive = entry.receive_channel
        if entry.front is not None:  # left by the activation whose commit failed
            message, entry.front = entry.front, None
            step = await self._handle(message)
            if step is not Next.CONTINUE:
                return step
        while True:
            try:
                message = receive.receive_nowait()
            except trio.WouldBlock:
                if entry.shutting_down:
                    return await self._shut_down()
                got = await self._wait_for_message()
                if got is None:
                    if self.inflight is not None:
                        inflight = await self._settle()
                        if inflight.error is not None:
                            return await self._failed_later(inflight)
                    if self.pending is not None and trio.current_time() >= self.flush_at:
                        await self._flush()
                        if self.conflicted is not None:
                            return await self._reload()
                        continue
                    if entry.shutting_down:
                        return await self._shut_down()
                    if not self._may_hibernate():
                        continue  # woken early, or it owes replies
                    step = await self._hibernate()
                    if step is Next.CONTINUE:
                        continue
                    return step
                message = got
            step = await self._handle(message)
            if step is not Next.CONTINUE:
                return step
            if self.pending is not None and trio.current_time() >= self.flush_at:
                await self._flush()
                if self.conflicted is not None:
                    return await self._reload()

    def _may_hibernate(self) -> bool:
        if self.owed:
            return False
        if self.entry.hibernate_now:
            return True
        timeout = self.idle_timeout
        return timeout is not None and trio.current_time() >= self.entry.last_activity + timeout

    def _touch(self) -> None:
        """A message was handled now: the idle deadline moves (timer infos excepted)."""
        entry = self.entry
        entry.last_activity = trio.current_time()
        if self.idle_timeout is not None:
            self.reaper.touch(entry, self.idle_timeout)
        if entry.sup.max_active is not None:
            entry.sup.touch(entry)

    async def _wait_for_message(self) -> Message | None:
        """Wait until a message comes (returned), or return None when the server may
        have to hibernate, flush or shut down: woken by the supervisor's idle reaper
        or at shutdown, or a deferred write is due. Nothing waits with a deadline per
        message: the reaper keeps the idle deadlines (see _idle.py)."""
        entry = self.entry
        if self._may_hibernate():
            return None  # asked to, or it was busy when its idle time ran out
        if self.idle_timeout is not None and not self.owed and entry.idle_group is None:
            # Not in the reaper's order of activity (its last owed reply was given by
            # another task): a check at its own due time.
            self.reaper.check_at(entry, entry.last_activity + self.idle_timeout)
        entry.sup.note_settled()
        if self.pending is None:
            message = await entry.receive_channel.receive()
        else:
            with trio.CancelScope(deadline=self.flush_at) as scope:
                entry.wait_scope = scope
                try:
                    message = await entry.receive_channel.receive()
                finally:
                    entry.wait_scope = None
            if scope.cancelled_caught:
                return None
        return None if message.kind is Kind.WAKE else message

    # -- one message ------------------------------------------------------------------

    async def _handle(self, message: Message) -> Next:
        entry, server, kind = self.entry, self.server, message.kind
        if self.inflight is not None:
            # The output gate: the previous message's commit settles first.
            inflight = await self._settle()
            if inflight.error is not None:
                entry.front = message  # the next activation handles it, first
                return await self._failed_later(inflight)
        if kind is Kind.TIMER:
            origin, info = message.payload
            if origin is not self:  # armed by an earlier activation: timers are volatile
                logger.debug("%s: a timer of an earlier activation is dropped", entry.ref,
                             extra=entry.extra)
                return Next.CONTINUE
            message = Message(kind, info, None, ())
        caller = Caller(self, message.slot) if kind is Kind.CALL else None  # type: ignore[arg-type]
        token = current_handling.set(
            Handling((*message.chain, entry.ref), caller, entry.waiting_on)
        )
        self.handling = True
        self.current = message
        try:
            if kind is Kind.CALL:
                result = await server.handle_call(message.payload, self.state)
            elif kind is Kind.CAST:
                result = await server.handle_cast(message.payload, self.state)
            elif kind is Kind.STOP:
                result = Stop(self.state, reason=message.payload, persist=False)
            elif kind is Kind.CRASH:
                raise SimulatedCrash(f"{entry.ref} crashed on purpose (trio_pgs.testing.crash)")
            else:
                result = await server.handle_info(message.payload, self.state)
            _check_result(result, kind, entry.ref)
        except Exception as exc:
            crash = ServerCrashed(f"{entry.ref} crashed handling a {kind.value}: {exc!r}")
            crash.__cause__ = exc
            return await self._crash(message, crash, exc)
        finally:
            self.handling = False
            current_handling.reset(token)
        entry.sup.counters.messages += 1

        if result.persist:
            try:
                data = entry.info.codec.encode(result.state, str(entry.ref))
            except StateEncodingError as exc:
                return await self._crash(message, exc, exc)
            if self.lag is not None:  # written later, the newest state only
                self.pending = None if data == self.record.data else data
                if self.pending is not None and self.flush_at == math.inf:
                    self.flush_at = trio.current_time() + self.lag
            elif data != self.record.data:
                if type(result) is not Stop:
                    return self._hand_off(data, message, caller, result)
                try:
                    await self._commit(data)
                except Exception as exc:
                    return await self._commit_failed(message, exc)
        self.state = result.state
        if kind is not Kind.TIMER:
            self._touch()
        if type(result) is Stop:
            return await self._stop(message, result)
        if caller is not None:
            if type(result) is Reply:
                message.slot.set(outcome.Value(result.value))  # type: ignore[union-attr]
            elif not caller.replied:
                self.owed[caller] = None
        self._release_gated()
        return Next.CONTINUE

    def _next_record(self, data: bytes) -> Record:
        # The hot path: one Record built directly (attrs.evolve costs twice as much).
        old, options = self.record, self.entry.info.options
        history = (old.data, *old.history)[: options.keep_history] if options.keep_history else ()
        return Record(
            old.kind, old.key, data, old.version + 1, options.state_version, old.epoch,
            time.time(), old.crashes, old.quarantined, history,
        )

    async def _commit(self, data: bytes) -> None:
        record = self._next_record(data)
        await self.entry.sup.writer.commit(Put(record, self.record.version))
        self.record = record

    def _hand_off(
        self, data: bytes, message: Message, caller: Caller | None, result: Any
    ) -> Next:
        """EACH_MESSAGE, the hot path: hand the new state to the writer and go on
        without waiting. The writer releases the reply (and the deferred replies given
        meanwhile) once the state is durable, or fails them; this server settles that
        commit before it handles anything else (its next message, hibernation, a
        stop, shutdown). So the output gate holds, and the server is not resumed just
        to pass a reply on."""
        inflight = _Inflight(self.state)
        record = self._next_record(data)
        put = Put(record, self.record.version)
        self.record = record
        self.state = result.state
        # The idle time counts from the commit (as when the server waits for it).
        inflight.touch = message.kind is not Kind.TIMER
        if caller is not None:
            if type(result) is Reply:
                inflight.reply = (message.slot, outcome.Value(result.value))
            elif not caller.replied:
                self.owed[caller] = None
        inflight.gated, self.gated = self.gated, []
        self.inflight = inflight
        self.current = None  # its caller is answered by the writer, whatever happens
        self.entry.sup.writer.submit(put, functools.partial(self._committed, inflight))
        return Next.CONTINUE

    def _committed(self, inflight: _Inflight, error: BaseException | None) -> None:
        """The writer's callback: release or fail the replies of a handed-off commit."""
        inflight.done, inflight.error = True, error
        ref = self.entry.ref
        if error is None and inflight.touch and not self.closed:
            self._touch()
        if inflight.reply is not None:
            slot, result = inflight.reply
            slot.set(result if error is None else outcome.Error(persistence_error(ref, error)))
        for caller, given in inflight.gated:
            caller._slot.set(
                given if error is None else outcome.Error(persistence_error(ref, error))
            )
        if inflight.waiter is not None:
            task, inflight.waiter = inflight.waiter, None
            trio.lowlevel.reschedule(task)
        elif error is not None:
            self.entry.wake()  # waiting for a message: go back to the stored record now

    async def _settle(self) -> _Inflight:
        """Wait for the handed-off commit's outcome (usually known already)."""
        inflight = self.inflight
        assert inflight is not None
        if not inflight.done:
            inflight.waiter = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                inflight.waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        self.inflight = None
        return inflight

    async def _failed_later(self, inflight: _Inflight) -> Next:
        """A handed-off commit failed (its callers have their PersistenceError): the
        server goes back to its last committed record, as in _commit_failed."""
        ref, error = self.entry.ref, inflight.error
        assert error is not None
        logger.error("%s: commit failed: %r", ref, error, extra=self.entry.extra)
        self.state = inflight.previous_state  # never the uncommitted one
        step = await self._back_to_stored(error)
        self.fail_owed(lambda: persistence_error(ref, error))
        return step

    async def _back_to_stored(self, reason: BaseException) -> Next:
        """End this activation (``terminate(reason)``); the next one loads the stored
        record: at once if messages wait or the server is PERMANENT, else on demand."""
        entry = self.entry
        await self._terminate(reason)
        if entry.mailbox_empty() and entry.info.options.restart is not Restart.PERMANENT:
            entry.end(not_found(entry.ref))
            return Next.END
        return Next.REACTIVATE

    async def _write(self, record: Record) -> None:
        """Commit *record* as the next version of the server's record."""
        old = self.record
        record = attrs.evolve(record, version=old.version + 1, updated_at=time.time())
        await self.entry.sup.writer.commit(Put(record, old.version))
        self.record = record

    async def _flush(self) -> bool:
        """Commit the pending state (WRITE_BEHIND, ON_STOP); on failure keep it pending
        and retry after max_lag. Returns whether nothing is left pending."""
        data = self.pending
        if data is None:
            return True
        try:
            await self._commit(data)
        except ConflictError as exc:
            # Another writer changed the record (the CLI, a second process): retrying
            # can never succeed. The unwritten state is dropped and the server reloads.
            logger.error("%s: a deferred write conflicts with the stored record (%s); the "
                         "unwritten state is dropped and the server reloads from the store",
                         self.entry.ref, exc, extra=self.entry.extra)
            self.pending, self.flush_at, self.conflicted = None, math.inf, exc
            return True
        except Exception:
            logger.exception("%s: a deferred write failed; it stays pending and is retried",
                             self.entry.ref, extra=self.entry.extra)
            self.flush_at = trio.current_time() + self.entry.info.options.max_lag
            return False
        if self.pending is data:
            self.pending, self.flush_at = None, math.inf
        return self.pending is None

    # -- replies ----------------------------------------------------------------------

    def release(self, caller: Caller, result: outcome.Outcome[Any]) -> None:
        """A deferred reply: held until the current message's commit, if any."""
        if caller._replied:
            return
        caller._replied = True
        self.owed.pop(caller, None)
        if self.handling:
            self.gated.append((caller, result))
        else:
            caller._slot.set(result)
            if not self.owed:
                self.entry.wake()  # given by another task: it may hibernate now

    def _release_gated(self) -> None:
        if self.gated:
            gated, self.gated = self.gated, []
            for caller, result in gated:
                caller._slot.set(result)

    def fail_owed(self, error: ErrorFactory) -> None:
        """Callers still owed a reply (given or not) get *error*."""
        gated, self.gated = self.gated, []
        owed, self.owed = self.owed, {}
        for caller in [c for c, _ in gated] + list(owed):
            caller._replied = True
            caller._slot.set_error(error())

    # -- endings ----------------------------------------------------------------------

    async def _terminate(self, reason: Any) -> None:
        self.close()
        try:
            await self.server.terminate(reason, self.state)
        except Exception:
            logger.exception("%s: terminate(%r) raised; ignored", self.entry.ref, reason,
                             extra=self.entry.extra)

    async def _crash(self, message: Message, error: BaseException, exc: Exception) -> Next:
        """The message is not committed. The crash is recorded (and may quarantine the
        server), then what the restart strategy says happens (record wiped, kept, or
        the server restarted), and only then does the caller hear of it."""
        entry, ref, options = self.entry, self.entry.ref, self.entry.info.options
        logger.error("%s crashed: %r", ref, exc, exc_info=exc, extra=entry.extra)
        await self._flush()  # deferred modes: the acknowledged state before the crash
        await self._terminate(exc)
        quarantined = False
        # An unencodable state is a crash that keeps the record even for TEMPORARY
        # servers: the server continues from its last committed state (DESIGN section 4).
        if options.restart is Restart.TEMPORARY and not isinstance(exc, StateEncodingError):
            await self._wipe()
            entry.end(not_found(ref))
            step = Next.END
        else:
            quarantined = await self._record_crash()
            if quarantined:
                entry.end(quarantined_error(ref))
                step = Next.END
            elif options.restart is Restart.PERMANENT or not entry.mailbox_empty():
                step = Next.REACTIVATE
            else:
                entry.end(not_found(ref))  # the mailbox is empty: nothing is failed
                step = Next.END
        entry.sup.note_crash(ref, quarantined, exc)
        if message.slot is not None:
            message.slot.set_error(error)
        self.fail_owed(_crashed_owing(ref, exc))
        return step

    async def _record_crash(self) -> bool:
        """Commit the crash in the record's bookkeeping (so it outlives the process);
        return whether the server is now quarantined."""
        options, now = self.entry.info.options, time.time()
        recent = [t for t in self.record.crashes if now - t < options.crash_window]
        crashes = (*recent, now)[-options.max_crashes :]
        quarantined = len(crashes) >= options.max_crashes
        try:
            await self._write(attrs.evolve(self.record, crashes=crashes, quarantined=quarantined))
        except Exception:
            logger.exception("%s: the crash could not be recorded in the store",
                             self.entry.ref, extra=self.entry.extra)
        if quarantined:
            logger.error(
                "%s quarantined: %d crashes within %ss; release it with "
                "supervisor.release(ref) or roll it back with supervisor.rollback(ref)",
                self.entry.ref, len(crashes), options.crash_window, extra=self.entry.extra,
            )
        return quarantined

    async def _commit_failed(self, message: Message, exc: Exception) -> Next:
        """The store refused the new state: the server goes back to its last committed
        record (reloaded by the next activation), then the caller hears of it."""
        ref = self.entry.ref
        logger.error("%s: commit failed: %r", ref, exc, extra=self.entry.extra)
        step = await self._back_to_stored(exc)
        if message.slot is not None:
            message.slot.set_error(persistence_error(ref, exc))
        self.fail_owed(lambda: persistence_error(ref, exc))
        return step

    async def _reload(self) -> Next:
        """The stored record changed under this activation (a deferred write met a
        ConflictError): end it, and let the next activation load the stored record."""
        assert self.conflicted is not None
        return await self._back_to_stored(self.conflicted)

    async def _stop(self, message: Message, result: Stop[Any]) -> Next:
        entry, ref, reason = self.entry, self.entry.ref, result.reason
        restart = entry.info.options.restart
        await self._terminate(reason)
        entry.sup.counters.stops += 1
        entry.sup.emit(EventType.STOPPED, ref, reason=reason)
        reply = None if result.reply is NO_REPLY else result.reply
        stopped = _stopped_owing(ref, reason)
        if reason == "normal" or restart is Restart.TEMPORARY:
            try:
                await self._wipe(raising=True)
            except Exception as exc:
                failure = exc
                if message.slot is not None:
                    message.slot.set_error(persistence_error(ref, failure))
                self.fail_owed(lambda: persistence_error(ref, failure))
                return Next.REACTIVATE
            self._release_gated()  # replies given by the stopping handler
            self.fail_owed(stopped)
            entry.end(not_found(ref))  # before the reply: a new start must not collide
            step = Next.END
        else:
            # The stop's own state is committed already (EACH_MESSAGE) or flushed now.
            self._release_gated()
            self.fail_owed(stopped)
            if not await self._flush():
                step = Next.REACTIVATE  # the stop's state could not be written: keep it
            elif restart is Restart.PERMANENT or not entry.mailbox_empty():
                step = Next.REACTIVATE
            else:
                entry.end(not_found(ref))
                step = Next.END
        if message.slot is not None:
            message.slot.set(outcome.Value(reply))
        return step

    async def _wipe(self, raising: bool = False) -> None:
        ref = self.entry.ref
        try:
            await self.entry.sup.writer.commit(Delete(ref.kind, ref.key, self.record.version))
        except Exception:
            if raising:
                raise
            logger.exception("%s: the record could not be wiped", ref, extra=self.entry.extra)

    async def _hibernate(self) -> Next:
        entry = self.entry
        if not await self._flush():
            self._touch()  # never drop a state: stay active, and try again later
            return Next.CONTINUE
        entry.status = Status.HIBERNATING
        await self._terminate("hibernate")
        if entry.shutting_down and entry.mailbox_empty():
            entry.end(not_running(entry.ref))
            return Next.END
        if not entry.mailbox_empty():
            # A message came while terminate ran: serve it from a fresh activation.
            entry.status = Status.ACTIVE
            return Next.REACTIVATE
        entry.sup.counters.hibernations += 1
        entry.sup.emit(EventType.HIBERNATED, entry.ref)
        entry.end(not_found(entry.ref))  # nothing queued: nothing failed
        logger.debug("%s hibernated", entry.ref, extra=entry.extra)
        return Next.END

    async def _shut_down(self) -> Next:
        entry = self.entry
        if self.inflight is not None:
            inflight = await self._settle()
            if inflight.error is not None:
                return await self._failed_later(inflight)
        if not await self._flush():
            entry.sup.note_unflushed(entry.ref)
        await self._terminate("shutdown")
        self.fail_owed(not_running(entry.ref))
        entry.end(not_running(entry.ref))
        return Next.END

    async def cut_off(self, error: ErrorFactory | None = None) -> None:
        """The task was cancelled (shutdown past its grace period) or hit an internal
        error: answer the caller of the message being handled and everyone owed a
        reply, then run `terminate("shutdown")` with the last committed state, in a
        shielded scope of its own bounded by TERMINATE_GRACE seconds."""
        ref = self.entry.ref
        if error is None:  # cancelled at shutdown
            error = lambda: cut_off_error(ref)  # noqa: E731
        if self.current is not None and self.current.slot is not None:
            self.current.slot.set_error(error())  # a no-op once it was answered
        self.fail_owed(error)
        if self.closed:
            return
        with trio.move_on_after(TERMINATE_GRACE, shield=True):
            await self._terminate("shutdown")

    def close(self) -> None:
        """Drop the volatile timers; idempotent."""
        self.closed = True
        timers, self.timers = self.timers, {}
        for scope in timers:
            scope.cancel()

    # -- timers -----------------------------------------------------------------------

    def send_after(self, delay: float, info: Any) -> None:
        if self.closed:
            return
        scope = trio.CancelScope()
        self.timers[scope] = None
        self.entry.sup.spawn_system_task(self._timer, scope, delay, info)

    async def _timer(self, scope: trio.CancelScope, delay: float, info: Any) -> None:
        current_handling.set(None)
        with scope:
            await trio.sleep(delay)
            self.timers.pop(scope, None)
            if not self.closed:
                # Tagged with this activation: one that fired just before hibernation
                # must not reach the next activation.
                message = Message(Kind.TIMER, (self, info), None, ())
                await self.entry.send_channel.send(message)


class _Inflight:
    """A commit handed to the writer by `Activation._hand_off`."""

    __slots__ = ("done", "error", "gated", "previous_state", "reply", "touch", "waiter")

    def __init__(self, previous_state: Any) -> None:
        self.previous_state = previous_state
        self.touch = False
        self.done = False
        self.error: BaseException | None = None
        self.reply: tuple[Any, outcome.Outcome[Any]] | None = None
        self.gated: list[tuple[Caller, outcome.Outcome[Any]]] = []
        self.waiter: trio.lowlevel.Task | None = None


#: Seconds `terminate("shutdown")` may take for a server cut off at shutdown.
TERMINATE_GRACE = 1.0


def cut_off_error(ref: ServerRef) -> SupervisorNotRunning:
    return SupervisorNotRunning(
        f"{ref}: the supervisor shut down while this message was being handled and the "
        "handler did not finish within shutdown_timeout; its changes were not committed. "
        "Open the supervisor again and retry"
    )


def _crashed_owing(ref: ServerRef, exc: BaseException) -> ErrorFactory:
    def error() -> BaseException:
        crash = ServerCrashed(f"{ref} crashed before replying: {exc!r}")
        crash.__cause__ = exc
        return crash

    return error


def _stopped_owing(ref: ServerRef, reason: str) -> ErrorFactory:
    return lambda: ServerCrashed(f"{ref} stopped ({reason!r}) before replying to this call")


_ALLOWED = {
    Kind.CALL: (Reply, NoReply, Stop),
    Kind.CAST: (NoReply, Stop),
    Kind.INFO: (NoReply, Stop),
    Kind.TIMER: (NoReply, Stop),
    Kind.STOP: (Stop,),
    Kind.CRASH: (),
}
_HOOK = {Kind.CALL: "handle_call", Kind.CAST: "handle_cast", Kind.INFO: "handle_info",
         Kind.TIMER: "handle_info", Kind.STOP: "stop", Kind.CRASH: "crash"}


def _check_result(result: Any, kind: Kind, ref: ServerRef) -> None:
    if type(result) in _ALLOWED[kind]:
        return
    check_not_coroutine(result, ref, _HOOK[kind])
    names = " / ".join(t.__name__ for t in _ALLOWED[kind])
    raise TypeError(
        f"{ref}: {_HOOK[kind]} must return {names}, not {result!r}"
    )


def check_not_coroutine(value: Any, ref: ServerRef, hook: str) -> None:
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()
        raise TypeError(
            f"{ref}: {hook} returned an awaitable ({value!r}); did you forget 'await'?"
        )


def persistence_error(ref: ServerRef, exc: BaseException) -> PersistenceError:
    cls = type(exc) if isinstance(exc, PersistenceError) else PersistenceError
    error = cls(f"{ref}: the state could not be committed: {exc}. The server went back "
                "to its last committed state; retry once the store is healthy")
    error.__cause__ = exc
    return error
