"""One activation of a server: its message loop, and how it ends.

Rule of this module: the activation decides what happens next (handle, hibernate,
stop, crash, shut down). Every reply goes through its `ReplyLedger`; new states go
through its persistence policy (`_policy.py`), and the writes that end an activation
(a stop's state, a wipe, the crash bookkeeping) through `_write` and `_wipe`, here;
everything it needs from the supervisor goes through the entry's `Host`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import outcome
import trio

from . import _logging  # noqa: F401  (one line per crash when logging is not configured)
from ._calls import Handling, Kind, Message, current_handling
from ._entry import Entry, Next, Status, not_found, not_running, quarantined_error
from ._errors import (
    ConflictError,
    OutcomeUnknown,
    PersistenceError,
    RequestError,
    ServerCrashed,
    SimulatedCrash,
    StateEncodingError,
    SupervisorNotRunning,
    TrioPGSError,
)
from ._events import EventType
from ._inline import cannot_suspend, first_step
from ._ledger import ErrorFactory, ReplyLedger, ReplySlot
from ._policy import Deferred, EachMessage, Policy
from ._reminding import ReminderBook
from ._results import NO_REPLY, NoReply, Reply, Stop
from ._schedule import StoredReminder
from ._server import Persistence, PersistentServer, Restart
from ._store import Delete, Operation, Put, Record, next_record, next_version

if sys.version_info < (3, 11):  # trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from ._ref import ServerRef

logger = logging.getLogger("trio_pgs")

#: The exception being handled where this is called (up the caller's frames), if any.
_handled_exception: Callable[[], BaseException | None] = (
    sys.exception if sys.version_info >= (3, 11) else lambda: sys.exc_info()[1]
)


def make_policy(entry: Entry) -> Policy:
    options = entry.info.options
    if options.persistence is Persistence.EACH_MESSAGE:
        return EachMessage(entry.host.writer, options.state_version, options.keep_history)
    lag = options.max_lag if options.persistence is Persistence.WRITE_BEHIND else math.inf
    return Deferred(lag, options.max_lag, str(entry.ref), entry.extra)


class Activation:
    """A server instance running on an entry, from `on_activate` to its end."""

    __slots__ = (
        "book", "closed", "committing", "current", "entry", "idle_timeout", "inline",
        "ledger", "policy", "record", "server", "state", "timers", "volatile",
    )

    def __init__(
        self, entry: Entry, server: PersistentServer[Any], state: Any, record: Record
    ) -> None:
        self.entry = entry
        self.server = server
        self.state = state
        self.record = record  # the last record handed to the store
        host = entry.host
        #: Its durable reminders (docs/reminders.md), committed with the state.
        self.book = ReminderBook(record.reminders, host.wall_offset, host.reminders_kept,
                                 entry.ref)
        self.idle_timeout = entry.info.options.idle_timeout
        self.ledger = ReplyLedger(entry)
        self.policy = make_policy(entry)
        # A dict used as an ordered set: an empty dict is a third of an empty set.
        self.timers: dict[trio.CancelScope, None] = {}
        self.closed = False
        #: The message being handled: its caller is answered if the handler is cut off.
        self.current: Message | None = None
        #: The operation of a commit of this activation's own that its callers wait on
        #: (a stop's, a deferred state's), while awaited: cut off now, its outcome is
        #: unknown, unless the writer never sent it.
        self.committing: Operation | None = None
        #: The state has changes made under ``persist=False`` (never encoded).
        self.volatile = False
        #: Its ``handle_call`` function, if its calls may be handled in their callers'
        #: tasks (`handle_inline`, which checks that it is still the one).
        hook = server.handle_call
        self.inline: object = getattr(hook, "__func__", None) if cannot_suspend(hook) else None
        self._touch()  # activated now: the idle deadline starts

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> Next:
        entry = self.entry
        if entry.front is not None:  # left by the activation whose commit failed
            front, entry.front = entry.front, None
            step = await self._handle(front)
            if step is not Next.CONTINUE:
                return step
        while True:
            due_at = self.book.due_at  # inf without reminders: no clock read per message
            if due_at != math.inf and due_at <= trio.current_time() and not entry.shutting_down:
                # One reminder, then a queued message if any: a reminder due again
                # at once (a short period, a slow handler) never starves the mailbox.
                step = await self._remind()
                if step is not Next.CONTINUE:
                    return step
            message = entry.mailbox.next_queued()
            if message is None:
                message = await self._wait_for_message()
                if message is None:
                    step = await self._idle_step()
                    if step is Next.CONTINUE:
                        continue
                    return step
            step = await self._handle(message)
            if step is not Next.CONTINUE:
                return step
            if self.policy.pending is not None and trio.current_time() >= self.policy.due:
                step = await self._flush_due()
                if step is not Next.CONTINUE:
                    return step

    async def _idle_step(self) -> Next:
        """Nothing to handle: settle the commit in flight, write what is due, then
        shut down or hibernate if it is time to."""
        inflight = await self.policy.settle()
        if inflight is not None and inflight.error is not None:
            return await self._failed_later(inflight.error, inflight.previous_state)
        if self.entry.shutting_down and not self.entry.mailbox_empty():
            # Accepted while the commit settled: handled before the shutdown, as a
            # server that was waiting would (a hibernation sends them on, as it is).
            return Next.CONTINUE
        if self.book.due_at <= trio.current_time() and not self.entry.shutting_down:
            return Next.CONTINUE  # a reminder is due: delivered before anything else
        if trio.current_time() >= self.policy.due:
            return await self._flush_due()
        if self.entry.shutting_down:
            return await self._shut_down()
        if not self._may_hibernate():
            return Next.CONTINUE  # woken early, or it owes replies
        return await self._hibernate()

    async def _flush_due(self) -> Next:
        await self.policy.flush(self._commit)
        conflict = self.policy.conflicted
        if conflict is not None:
            step = await self._back_to_stored(conflict)
            self.ledger.fail_owed(_owed_at_reload(self.entry.ref, conflict))
            return step
        return Next.CONTINUE

    @property
    def ref(self) -> ServerRef:
        return self.entry.ref

    @property
    def reminders(self) -> tuple[StoredReminder, ...]:
        """The reminders as the handlers left them (what the next write commits)."""
        return self.book.current

    def late_at_shutdown(self) -> str:
        """What a server still running at the shutdown deadline was doing:
        ``"handling"`` (its message is lost: not committed), ``"committing"`` (the
        store has its change: the outcome is unknown), or ``"ending"`` (terminate or
        the like; nothing is lost)."""
        inflight = self.policy.inflight
        queued = self.entry.host.writer.queued
        if self.committing is not None:
            if not queued(self.committing):
                return "committing"
            self.committing = None  # never sent (the writer fails it): not committed
            return "handling"
        if inflight is not None and not inflight.done:
            return "handling" if queued(inflight) else "committing"
        if self.current is not None or self.policy.pending is not None:
            return "handling"
        return "ending"

    def idle(self) -> bool:
        """Whether nothing holds the server awake: no handler running, no reply owed,
        no commit in flight (what ``max_active`` picks from)."""
        inflight = self.policy.inflight
        return (
            self.current is None and not self.ledger.owed
            and (inflight is None or inflight.done)
        )

    def _may_hibernate(self) -> bool:
        if self.ledger.owed or self.policy.inflight is not None:
            return False
        if self.entry.hibernate_now:
            return True
        timeout = self.idle_timeout
        return timeout is not None and trio.current_time() >= self.entry.last_activity + timeout

    def _touch(self, now: float | None = None) -> None:
        """A message was handled *now* (None: read the clock): the idle deadline moves
        (timer infos excepted)."""
        entry = self.entry
        entry.last_activity = trio.current_time() if now is None else now
        entry.host.touch(entry, self.idle_timeout)

    async def _wait_for_message(self) -> Message | None:
        """Wait until a message comes (returned), or return None when the server may
        have to hibernate, flush or shut down: woken by the supervisor's idle reaper
        or at shutdown, or a deferred write is due. Nothing waits with a deadline per
        message: the reaper keeps the idle deadlines (see _idle.py)."""
        entry = self.entry
        entry.host.note_settled(entry)  # may ask it to hibernate (max_active)
        if entry.shutting_down or self._may_hibernate():
            return None
        due = min(self.policy.due, self.book.due_at)  # a deferred write, or a reminder
        if due != math.inf and due <= trio.current_time():  # inf: no clock read
            return None
        if (
            self.idle_timeout is not None and not self.ledger.owed
            and entry.idle_group is None
        ):
            # Not in the reaper's order of activity (its last owed reply was given by
            # another task): a check at its own due time.
            entry.host.check_idle_at(entry, entry.last_activity + self.idle_timeout)
        if due == math.inf:
            message = await entry.mailbox.receive()
        else:
            with trio.move_on_at(due):
                message = await entry.mailbox.receive()
                return None if message.kind is Kind.WAKE else message
            return None
        return None if message.kind is Kind.WAKE else message

    # -- one message ------------------------------------------------------------------

    async def _handle(self, message: Message) -> Next:
        entry, kind = self.entry, message.kind
        if kind is Kind.RESUME:  # the rest of a call handled in its caller's task
            return await message.payload  # type: ignore[no-any-return]
        if not self.policy.settled():  # the output gate: the previous commit
            entry.front = message  # cut off meanwhile, it is answered from there
            inflight = await self.policy.settle()
            if inflight is not None and inflight.error is not None:
                # The next activation handles the message first, from the stored record.
                return await self._failed_later(inflight.error, inflight.previous_state)
            entry.front = None
        if kind is Kind.TIMER:
            origin, info = message.payload
            if origin is self.book:  # a reminder, advanced already by `_remind`
                pass
            elif origin is not self:  # armed by an earlier activation: timers are volatile
                logger.debug("%s: a timer of an earlier activation is dropped", entry.ref,
                             extra=entry.extra)
                return Next.CONTINUE
            else:
                self.book.begin()
            message = Message(kind, info, None, ())
        else:
            self.book.begin()
        handling = self._begin(message, message.slot if kind is Kind.CALL else None)
        token = current_handling.set(handling)
        try:
            result = await self._hook(message)  # the hook's own coroutine: no extra frame
            _check_result(result, kind, entry.ref)
        except BaseException as exc:
            return await self._hook_failed(message, exc)
        finally:
            handling.live = False
            current_handling.reset(token)
        entry.host.counters.messages += 1
        step = self._handled(message, handling, result)
        return step if type(step) is Next else await step  # type: ignore[misc]

    async def _hook_failed(self, message: Message, exc: BaseException) -> Next:
        """The hook that handled *message* raised *exc* (its handling still live)."""
        entry, kind = self.entry, message.kind
        if isinstance(exc, RequestError):
            return await self._refused(message, exc)
        if isinstance(exc, SupervisorNotRunning):
            if not entry.shutting_down:
                return await self._crash(message, _crashed(entry.ref, kind, exc), exc)
            return self._not_served(message, exc)
        if isinstance(exc, Exception):
            return await self._crash(message, _crashed(entry.ref, kind, exc), exc)
        interruption = interruption_in(exc)
        if interruption is None:
            raise exc  # cancelled: the task's scope takes it
        return await self._interrupted(message, interruption)

    def _begin(self, message: Message, slot: ReplySlot | None) -> Handling:
        """*message* is handled from now on (its caller's *slot*, for a call): its
        `Handling`, and the replies held for its outcome."""
        ledger = self.ledger
        ledger.holding = True
        ledger.current = message.slot
        self.current = message
        return Handling(self.entry.ref, message.chain, self.entry.waiting_on, slot, ledger)

    # -- a call handled in its caller's task (_inline.py) -----------------------------

    @trio.lowlevel.enable_ki_protection
    def handle_inline(self, message: Message) -> bool:
        """Handle the call *message* here, in the caller's task, if the server's task
        only waits for a message (the caller checked that `inline` is true): as that
        task would, with no checkpoint, so no other task sees it half done. What must
        wait (a crash, a stop) is left to the server's task, as a `Kind.RESUME` it
        takes before anything else. Returns False, having done nothing, otherwise.

        KI-protected, as the server's task is: a Ctrl-C never leaves that task's turn
        taken, and goes to the main task at its next checkpoint, not into the handler."""
        entry, policy, book = self.entry, self.policy, self.book
        hook = self.server.handle_call
        if getattr(hook, "__func__", None) is not self.inline:  # replaced since
            if not cannot_suspend(hook):
                return False
            self.inline = hook.__func__  # type: ignore[attr-defined]
        if _handled_exception() is not None:
            # The caller handles an exception: the handler would see it (sys.exception(),
            # its own exceptions' __context__). In the server's task it sees none.
            return False
        mailbox = entry.mailbox
        task = mailbox.take_receiver()
        if task is None:
            return False
        if entry.shutting_down or entry.hibernate_now or not policy.settled():
            mailbox.give_back(task)
            return False
        write_due, reminder_due = policy.due, book.due_at  # what the server's task waits for
        try:
            rest = task.context.run(self._inline_step, message, hook)
        except BaseException as exc:  # ours, not the handler's: the server's task meets it
            rest = Message(Kind.RESUME, _raise(exc), None, ())
        mailbox.give_back(task, rest)
        if rest is None:
            entry.host.note_settled(entry)  # as the server's task does when it waits again
            if (
                entry.shutting_down or entry.hibernate_now
                or policy.due < write_due or book.due_at < reminder_due
            ):
                entry.wake()  # asked meanwhile, or a deferred write or reminder due sooner
        return True

    def _inline_step(self, message: Message, hook: Callable[..., Any]) -> Message | None:
        """`_handle` for a call whose handler `cannot_suspend`, in the server task's
        context: None if done, else the `Kind.RESUME` for the server's task."""
        entry = self.entry
        self.book.begin()
        handling = self._begin(message, message.slot)
        token = current_handling.set(handling)
        try:
            result = first_step(hook(message.payload, self.state))
            _check_result(result, Kind.CALL, entry.ref)
        except BaseException as exc:
            return Message(Kind.RESUME, self._failed_live(message, handling, exc), None, ())
        finally:
            current_handling.reset(token)
        handling.live = False
        entry.host.counters.messages += 1
        step = self._handled(message, handling, result)
        if step is Next.CONTINUE:
            return None
        return Message(Kind.RESUME, step, None, ())

    async def _failed_live(self, message: Message, handling: Handling, exc: BaseException) -> Next:
        """`_hook_failed` for a call `handle_inline` began, its handling current and
        live until it is dealt with, as in `_handle`."""
        token = current_handling.set(handling)
        try:
            return await self._hook_failed(message, exc)
        finally:
            handling.live = False
            current_handling.reset(token)

    def _hook(self, message: Message) -> Coroutine[Any, Any, Any]:
        """The coroutine of the hook that handles *message*."""
        if message.trace is not None:
            return self._traced_hook(message)
        server, kind = self.server, message.kind
        if kind is Kind.CALL:
            return server.handle_call(message.payload, self.state)
        if kind is Kind.CAST:
            return server.handle_cast(message.payload, self.state)
        if kind is Kind.STOP or kind is Kind.CRASH:
            return self._internal_hook(message)
        return server.handle_info(message.payload, self.state)

    async def _traced_hook(self, message: Message) -> Any:
        """The hook, inside the tracing's span for the message (child of the sender's)."""
        tracing = self.entry.host.tracing
        assert tracing is not None
        carried, message.trace = message.trace, None
        with tracing.handling(self.entry.ref, message.kind.value, carried):
            return await self._hook(message)

    async def _internal_hook(self, message: Message) -> Any:
        """A stop asked through the ref, or `trio_pgs.testing.crash`."""
        await trio.lowlevel.checkpoint()
        if message.kind is Kind.CRASH:
            raise SimulatedCrash(f"{self.entry.ref} crashed on purpose (trio_pgs.testing.crash)")
        return Stop(self.state, reason=message.payload, persist=False)

    def _handled(
        self, message: Message, handling: Handling, result: Any
    ) -> Next | Coroutine[Any, Any, Next]:
        """The handler returned *result*: hand its state to the policy and answer.
        Synchronous on the hot path; a coroutine to await where it must wait (a
        crash, a stop)."""
        self.volatile = not result.persist
        data = None
        reminded = self.book.current is not self.record.reminders
        if result.persist:
            try:
                data = self.entry.info.codec.encode(result.state, self.entry.ref)
            except StateEncodingError as exc:
                return self._crash(message, exc, exc)
            if data == self.record.data and self.policy.pending is None and not reminded:
                data = None  # nothing new to write
        elif reminded:  # the state stays unwritten; its reminders are committed
            data = self.policy.pending or self.record.data
        if type(result) is Stop:
            return self._stopping(message, result, data)
        previous, self.state = self.state, result.state
        self.current = None
        timer = message.kind is Kind.TIMER
        if data is None and self.policy.inflight is None:
            self.ledger.release()  # nothing to wait for: the reply goes out at once
        if message.kind is Kind.CALL:  # its caller's token exists if the handler took it
            if type(result) is Reply:
                value = outcome.Value(result.value)
                self.ledger.reply(message.slot, handling.caller, value)  # type: ignore[arg-type]
            else:
                self.ledger.owe(handling.caller_token())  # type: ignore[arg-type]
        if data is not None:
            # After the reply is in the ledger: a commit that fails at once (the
            # writer stopped) fails it too.
            self.policy.changed(self, data, previous, not timer)
            if self.policy.inflight is not None:
                # Handed to the writer: its callback moves the idle deadline (the idle
                # time counts from the commit), and until then the server does not
                # hibernate (a commit in flight), so it is not moved twice.
                return Next.CONTINUE
            self.ledger.release()  # a deferred policy: replies go out now
        if not timer:
            self._touch()
        return Next.CONTINUE

    async def _stopping(self, message: Message, result: Stop[Any], data: bytes | None) -> Next:
        """A `Stop`: its state is committed first (EACH_MESSAGE) or handed to the
        deferred policy, which `_stop` flushes."""
        if data is not None:
            if type(self.policy) is EachMessage:
                try:
                    await self._commit(data)
                except Exception as exc:
                    return await self._commit_failed(message, exc)
            else:
                self.policy.changed(self, data, self.state, message.kind is not Kind.TIMER)
        self.state = result.state
        self.current = None
        if message.kind is not Kind.TIMER:
            self._touch()
        return await self._stop(message, result, changed=data is not None)

    def commit_settled(self, error: BaseException | None, touch: bool) -> None:
        """The writer's callback for a handed-off commit: the held replies go out, or
        fail with the commit's error (and a waiting server goes back to its record)."""
        entry = self.entry
        if error is None:
            self.ledger.release()
            if touch and not self.closed:
                # The idle time counts from the commit (its batch's: one clock read).
                self._touch(entry.host.writer.settled_at)
            entry.host.note_settled(None)  # idle now: max_active, wait_all_idle
            if entry.hibernate_now:
                # Asked to hibernate while it handled this message: it began waiting
                # with this commit in flight, so it did not then; it may now.
                entry.wake()
        else:
            ref = entry.ref
            self.ledger.fail_held(lambda: persistence_error(ref, error), _reply_lost(ref, error))
            entry.wake()  # waiting for a message: go back to the stored record now

    async def _refused(self, message: Message, error: RequestError) -> Next:
        """A `RequestError`: the request is refused, the state stays, not a crash.

        A handler that changed the state in place before refusing would leave it
        changed: that is detected (the state no longer encodes as it was last
        written) and the server goes back to its stored state, as after a crash but
        without counting one. After a ``persist=False`` change the state's encoding
        is not known, and the state is kept as it is."""
        entry = self.entry
        entry.host.counters.refusals += 1
        self.current = None
        self.book.refused()
        if self.book.current is not self.record.reminders:
            await self.commit_reminders()  # a reminder it was delivering: delivered
        if message.slot is not None:
            self.ledger.answer(message.slot, outcome.Error(error))
        else:
            logger.warning("%s refused a %s: %s", entry.ref, message.kind.value, error,
                           extra=entry.extra)
        in_place = not self.volatile and self._changed_in_place()
        if in_place:
            # Deferred replies it gave may tell of the state it changed, which goes
            # away: not released. Its own caller still hears of the refusal.
            self.ledger.fail_held(lambda: error, _owed_at_reload(entry.ref, error))
        else:
            self.ledger.release()
        if message.kind is not Kind.TIMER:
            self._touch()
        if in_place:
            logger.warning("%s changed its state in place before refusing a %s; it goes "
                           "back to its stored state", entry.ref, message.kind.value,
                           extra=entry.extra)
            await self._flush_before_ending()  # the acknowledged state, if deferred
            step = await self._back_to_stored(error)
            self.ledger.fail_owed(_owed_at_reload(entry.ref, error))
            return step
        return Next.CONTINUE

    async def _flush_before_ending(self, *, own: bool = True) -> None:
        """Deferred modes, before the activation ends (a crash, a stop that keeps the
        record, a refusal that goes back to the stored state): commit the acknowledged
        state. A store error is retried every ``max_lag`` seconds, the server handling
        nothing meanwhile, until it is written (or dropped for a conflict: another
        writer changed the record), or until the shutdown's deadline cuts the server
        off (`statistics().unflushed` then lists it): the next activation loads the
        record, so ending before would drop the acknowledged state. The shutdown's
        start (`Entry.wake`) makes it retry at once."""
        write = functools.partial(self._commit, own=own)
        entry = self.entry
        while not await self.policy.flush(write):
            # Retried at its due time, or at once when woken (the shutdown began).
            entry.retry_now = retry_now = trio.Event()
            try:
                with trio.move_on_at(self.policy.due):
                    await retry_now.wait()
            finally:
                entry.retry_now = None

    def _changed_in_place(self) -> bool:
        written = self.policy.pending or self.record.data
        try:
            return self.entry.info.codec.encode(self.state, str(self.entry.ref)) != written
        except StateEncodingError:
            return True

    async def _commit(self, data: bytes, *, own: bool = True) -> None:
        """Commit the state *data* and wait for it: a change of the message being
        handled or an acknowledged deferred state (*own*: see `_write`)."""
        options = self.entry.info.options
        await self._write(
            next_record(self.record, data, options.state_version, options.keep_history,
                        self.book.current),
            own=own,
        )

    async def commit_reminders(self) -> None:
        """Commit the reminders alone, with the last committed state: set in
        ``on_activate``, or a delivery whose message was refused. A failure is logged:
        they are committed with the next state, or the reminder is delivered again."""
        try:
            await self._commit(self.record.data, own=False)
        except Exception:
            logger.exception("%s: its reminders could not be committed; a delivered one "
                             "is delivered again", self.entry.ref, extra=self.entry.extra)

    async def _write(self, record: Record, *, own: bool = True) -> None:
        """Commit *record* (the next version) and wait for it. *own*: a change its
        callers wait on, whose outcome is unknown if this is cut off (the crash
        bookkeeping is not: the crashing message is not committed either way)."""
        operation = Put(record, self.record.version)
        # Stays set if cancelled: cut_off says "unknown".
        self.committing = operation if own else None
        try:
            await self.entry.host.writer.commit(operation)
        except Exception:
            self.committing = None
            raise
        self.committing = None
        self.record = record

    # -- endings ----------------------------------------------------------------------

    async def _failed_later(self, error: BaseException, previous_state: Any) -> Next:
        """A handed-off commit failed (its held replies have failed already): the
        server goes back to its last committed record, as in `_commit_failed`."""
        ref = self.entry.ref
        logger.error("%s: commit failed: %r", ref, error, extra=self.entry.extra)
        self.state = previous_state  # never the uncommitted one
        step = await self._back_to_stored(error)
        self.ledger.fail(lambda: persistence_error(ref, error), _reply_lost(ref, error))
        return step

    async def _back_to_stored(self, reason: BaseException) -> Next:
        """End this activation (``terminate(reason)``); the next one loads the stored
        record: at once if messages wait or the server is PERMANENT, else on demand."""
        entry = self.entry
        await self._terminate(reason)
        if entry.info.options.restart is Restart.PERMANENT or not entry.mailbox_empty():
            return Next.REACTIVATE
        entry.end(not_found(entry.ref))  # nothing queued: nothing failed
        return Next.END

    async def _commit_failed(self, message: Message, exc: Exception) -> Next:
        """The store refused the new state: the server goes back to its last committed
        record (reloaded by the next activation), then the caller hears of it."""
        ref = self.entry.ref
        logger.error("%s: commit failed: %r", ref, exc, extra=self.entry.extra)
        step = await self._back_to_stored(exc)
        self.ledger.fail(lambda: persistence_error(ref, exc), _reply_lost(ref, exc))
        self._answer_current(lambda: persistence_error(ref, exc))
        return step

    def _answer_current(self, error: ErrorFactory) -> None:
        """The caller of the message being handled gets *error* (if not answered)."""
        message, self.current = self.current, None
        if message is not None and message.slot is not None:
            self.ledger.fail_now(message.slot, error)

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
        self.book.crashed()  # what it set is dropped; what it was delivering is due again
        # Deferred modes: the state acknowledged before the crash, not the crashing one's.
        await self._flush_before_ending(own=False)
        await self._terminate(exc)
        quarantined = False
        # An unencodable state is a crash that keeps the record even for TEMPORARY
        # servers: the server continues from its last committed state (docs/lifecycle.md).
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
        entry.host.note_crash(ref, quarantined, exc)
        self._answer_current(lambda: error)
        self.ledger.fail(_crashed_owing(ref, exc))
        return step

    async def _record_crash(self) -> bool:
        """Commit the crash in the record's bookkeeping (so it outlives the process);
        return whether the server is now quarantined."""
        options, now = self.entry.info.options, time.time()
        recent = [t for t in self.record.crashes if now - t < options.crash_window]
        crashes = (*recent, now)[-options.max_crashes :]
        quarantined = len(crashes) >= options.max_crashes
        try:
            await self._write(
                next_version(self.record, crashes=crashes, quarantined=quarantined), own=False
            )
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

    def _not_served(self, message: Message, error: SupervisorNotRunning) -> Next:
        """The handler met the shutdown (a call to a server that cannot activate any
        more): its message is not committed, and it is not a crash."""
        ref = self.entry.ref
        logger.info("%s: %s raised during the shutdown; its message is not committed",
                    ref, error, extra=self.entry.extra)
        self.book.crashed()
        self._answer_current(lambda: error)
        self.ledger.fail_held(lambda: error, _reply_lost(ref, error))
        return Next.CONTINUE  # the loop goes on to shut down

    async def _interrupted(self, message: Message, exc: BaseException) -> Next:
        """A KeyboardInterrupt or SystemExit out of a handler: the message is not
        committed, and the whole supervisor shuts down (then raises it as itself)."""
        logger.error("%s: %r raised in a handler; shutting the supervisor down",
                     self.entry.ref, exc, extra=self.entry.extra)
        self.book.crashed()  # not committed: neither what it set nor its delivery
        self._answer_current(_interrupted_error(self.entry.ref, exc))
        self.entry.host.interrupt(exc)
        self.entry.shutting_down = True
        return await self._shut_down()

    async def _stop(self, message: Message, result: Stop[Any], changed: bool = False) -> Next:
        """End the activation for a `Stop` (*changed*: it changed the state, committed
        before the delete, or by it written first if the delete fails)."""
        entry, ref, reason = self.entry, self.entry.ref, result.reason
        restart = entry.info.options.restart
        await self._terminate(reason)
        entry.host.counters.stops += 1
        entry.host.emit(EventType.STOPPED, ref, reason=reason)
        reply = outcome.Value(None if result.reply is NO_REPLY else result.reply)
        self.current = message  # answered below, or cut off with its outcome unknown
        if reason == "normal" or restart is Restart.TEMPORARY:
            try:
                await self._wipe(raising=True)
            except Exception as exc:
                # Not stopped: the server goes on from its record, which takes the
                # deferred modes' acknowledged state first. The stop's own change, if
                # any, was committed before the delete: its caller must not retry.
                await self._flush_before_ending()
                failure = exc
                self.ledger.fail(lambda: persistence_error(ref, failure),
                                 _reply_lost(ref, failure))
                self._answer_current(
                    _stop_not_done(ref, failure) if changed
                    else lambda: persistence_error(ref, failure)
                )
                return Next.REACTIVATE
            step = Next.END
        else:
            await self._flush_before_ending()
            if restart is Restart.PERMANENT or not entry.mailbox_empty():
                step = Next.REACTIVATE
            else:
                step = Next.END
        self.ledger.release()  # replies given by the stopping handler
        self.ledger.fail(_stopped_owing(ref, reason))
        if step is Next.END:
            entry.end(not_found(ref))  # before the reply: a new start must not collide
        self.current = None
        if message.slot is not None:
            self.ledger.answer(message.slot, reply)  # released above: goes out now
        return step

    async def _wipe(self, raising: bool = False) -> None:
        """Delete the record: a stop's (*raising*), or a TEMPORARY server's crash."""
        ref = self.entry.ref
        operation = Delete(ref.kind, ref.key, self.record.version, self.record.epoch)
        # A stop's: if cancelled, cut_off says "unknown".
        self.committing = operation if raising else None
        try:
            await self.entry.host.writer.commit(operation)
        except Exception:
            self.committing = None
            if raising:
                raise
            logger.exception("%s: the record could not be wiped", ref, extra=self.entry.extra)
        self.committing = None

    async def _hibernate(self) -> Next:
        entry = self.entry
        entry.status = Status.HIBERNATING  # from now on, its timers fire into nothing
        if not await self.policy.flush(self._commit):
            entry.status = Status.ACTIVE
            self._touch()  # never drop a state: stay active, and try again later
            return Next.CONTINUE
        await self._terminate("hibernate")
        if entry.shutting_down and entry.mailbox_empty():
            entry.end(not_running(entry.ref))
            return Next.END
        if not entry.mailbox_empty():
            # A message came while it hibernated: serve it from a fresh activation.
            # It is in use: an early hibernation (max_active) is not asked any more.
            entry.status = Status.ACTIVE
            entry.hibernate_now = False
            return Next.REACTIVATE
        entry.host.counters.hibernations += 1
        entry.host.emit(EventType.HIBERNATED, entry.ref)
        entry.end(not_found(entry.ref))  # nothing queued: nothing failed
        logger.debug("%s hibernated", entry.ref, extra=entry.extra)
        return Next.END

    async def _shut_down(self) -> Next:
        entry = self.entry
        inflight = await self.policy.settle()
        if inflight is not None and inflight.error is not None:
            self.state = inflight.previous_state
        if not await self.policy.flush(self._commit):
            entry.host.note_unflushed(entry.ref)
        await self._terminate("shutdown")
        self.ledger.fail(_owed_at_shutdown(entry.ref))
        entry.end(not_running(entry.ref))
        return Next.END

    async def cut_off(self, error: ErrorFactory | None = None) -> None:
        """The task was cancelled (shutdown past its deadline) or hit an internal
        error: answer the caller of the message being handled and everyone owed a
        reply, then run `terminate("shutdown")` with the last committed state, in a
        shielded scope of its own bounded by TERMINATE_GRACE seconds.

        A commit handed to the writer is not this activation's to answer: the writer
        tells the replies it holds the commit's outcome (committed, failed, or
        unknown)."""
        ref = self.entry.ref
        inflight = self.policy.inflight
        if self.committing is not None:  # the store had its own message's change
            self._answer_current(_outcome_unknown(ref))
            self.ledger.fail(_outcome_unknown(ref))
        else:
            self._answer_current(error or (lambda: cut_off_error(ref)))
            owed = error or _owed_at_shutdown(ref)
            if inflight is not None and not inflight.done:
                self.ledger.fail_owed(owed)  # the held replies are the writer's
            else:
                self.ledger.fail(owed)
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

    async def _remind(self) -> Next:
        """Deliver the reminder due first to ``handle_info``: it is advanced now, and
        the advance is committed with what the handler changes (at-least-once)."""
        if self.policy.inflight is not None:
            inflight = await self.policy.settle()  # as `_handle` would: the output gate
            if inflight is not None and inflight.error is not None:
                return await self._failed_later(inflight.error, inflight.previous_state)
        reminder = self.book.take_due()
        if reminder is None:
            return Next.CONTINUE
        self.entry.host.counters.reminders += 1
        return await self._handle(Message(Kind.TIMER, (self.book, reminder), None, ()))

    def send_after(self, delay: float, info: Any) -> None:
        if self.closed:
            return
        scope = trio.CancelScope()
        self.timers[scope] = None
        self.entry.host.spawn(self._timer, scope, delay, info)

    @trio.lowlevel.enable_ki_protection
    async def _timer(self, scope: trio.CancelScope, delay: float, info: Any) -> None:
        current_handling.set(None)
        with scope:
            await trio.sleep(delay)
            self.timers.pop(scope, None)
            if not self.closed and self.entry.status is Status.ACTIVE:
                # Tagged with this activation: one that fired just before hibernation
                # must not reach the next activation.
                message = Message(Kind.TIMER, (self, info), None, ())
                await self.entry.mailbox.send(message)


#: Seconds `terminate("shutdown")` may take for a server cut off at shutdown.
TERMINATE_GRACE = 1.0


def cut_off_error(ref: ServerRef) -> SupervisorNotRunning:
    return SupervisorNotRunning(
        f"{ref}: the supervisor shut down while this message was being handled and the "
        "handler did not finish within shutdown_timeout; its changes were not committed. "
        "Open the supervisor again and retry"
    )


def _outcome_unknown(ref: ServerRef) -> ErrorFactory:
    return lambda: OutcomeUnknown(
        f"{ref}: the supervisor shut down while this message's commit was with the "
        "store; it may or may not be stored. Read the server's state before retrying"
    )


def _owed_at_shutdown(ref: ServerRef) -> ErrorFactory:
    return lambda: OutcomeUnknown(
        f"{ref}: the supervisor shut down before this call's deferred reply was given. "
        "The request was handled, and its changes committed or with the store; read "
        "the server's state before retrying"
    )


def _reply_lost(ref: ServerRef, exc: BaseException) -> ErrorFactory:
    """For a caller owed a deferred reply when a later message could not commit."""
    return lambda: OutcomeUnknown(
        f"{ref}: this call's request was handled and committed, but its deferred reply "
        f"was lost: the message that gave it (or a later one) failed ({exc}). Read the "
        "server's state before retrying"
    )


def _owed_at_reload(ref: ServerRef, why: BaseException) -> ErrorFactory:
    """For a caller owed a deferred reply when its server goes back to its stored
    record (a refusal after an in-place change, a deferred write's conflict): the
    activation that held its token is gone."""
    return lambda: OutcomeUnknown(
        f"{ref}: the server went back to its stored record ({why}) before giving this "
        "call's deferred reply; the request was handled, and its change may or may not "
        "be stored. Read the server's state before retrying"
    )


def _stop_not_done(ref: ServerRef, exc: BaseException) -> ErrorFactory:
    """For the caller of a `Stop` whose state was committed, but whose delete failed."""
    return lambda: OutcomeUnknown(
        f"{ref}: the stop's state was committed, but deleting the record failed ({exc}): "
        "the server was not stopped, and goes on from that state. Read it before "
        "retrying"
    )


def _interrupted_error(ref: ServerRef, exc: BaseException) -> ErrorFactory:
    return lambda: SupervisorNotRunning(
        f"{ref}: the handler raised {type(exc).__name__}, which shuts the supervisor "
        "down; this message's changes were not committed"
    )


def _crashed(ref: ServerRef, kind: Kind, exc: Exception) -> ServerCrashed:
    crash = ServerCrashed(f"{ref} crashed handling a {kind.value}: {exc!r}")
    crash.__cause__ = exc
    return crash


def interruption_in(error: BaseException) -> BaseException | None:
    """What to shut the supervisor down for and re-raise, out of a BaseException that
    is not an Exception: a KeyboardInterrupt or SystemExit (found inside exception
    groups too: a handler's own nursery wraps a Ctrl-C its child task got), else the
    first other leaf that is not a cancellation; None if all is cancellation."""
    leaves = list(_leaves(error))
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt | SystemExit):
            return leaf
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled | Exception):
            return leaf
    return None


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


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
    if type(result) is Reply and kind is Kind.CALL:  # the hot path: no hash of an enum
        return
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


def persistence_error(ref: ServerRef, exc: BaseException) -> TrioPGSError:
    """What a caller is told of a commit that failed with *exc*."""
    if isinstance(exc, SupervisorNotRunning):  # the writer stopped before sending it
        stopped = SupervisorNotRunning(f"{ref}: {exc}")
        stopped.__cause__ = exc
        return stopped
    cls = type(exc) if isinstance(exc, PersistenceError) else PersistenceError
    if issubclass(cls, OutcomeUnknown):
        text = (f"{ref}: the outcome of the commit is unknown ({exc}); it may or may not "
                "be stored. Read the server's state before retrying")
    else:
        text = (f"{ref}: the state could not be committed: {exc}. The server went back "
                "to its last committed state; retry once the store is healthy")
    error = cls(text)
    if isinstance(error, ConflictError) and isinstance(exc, ConflictError):
        error.fenced = exc.fenced  # in a cluster, a fenced call is routed again
    error.__cause__ = exc
    return error


async def _raise(exc: BaseException) -> Next:
    """*exc*, raised in the task that awaits this."""
    raise exc
