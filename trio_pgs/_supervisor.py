"""`PersistentSupervisor`: the nursery that servers run in, and how refs reach them."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, cast

import attrs
import cattrs
import trio
from cattrs.preconf.json import make_converter as make_json_converter
from typing_extensions import TypeVarTuple, Unpack

from . import _routing as routing
from ._activation import TERMINATE_GRACE
from ._calls import Handling, Kind, Message, current_handling, live_handling
from ._cluster import Cluster, ClusterNode
from ._deadlock import check_across, check_no_deadlock, would_deadlock
from ._encoding import Codec
from ._entry import Counters, Entry, KindInfo, StartRequest, Status
from ._errors import (
    AlreadyStarted,
    ConflictError,
    ServerCrashed,
    ServerNotFound,
    SupervisorEscalated,
    SupervisorNotRunning,
    UnknownKind,
)
from ._events import EventType, ServerEvent, Tracing, traced_async, traced_call, traced_stop
from ._idle import IdleReaper
from ._ledger import ReplySlot, WaitEdge
from ._ref import ServerRef, check_key
from ._registry import open_supervisors
from ._runtime import serve
from ._server import (
    HasInit,
    PersistentServer,
    Restart,
    check_option_names,
    check_shaping,
    resolve_options,
)
from ._statistics import SupervisorStatistics
from ._store import (
    Claim,
    Put,
    Record,
    Store,
    SupportsKinds,
    SupportsMembership,
    SupportsReminders,
    claimer,
    due_of,
    keeps_reminders,
    next_version,
)
from ._wakeups import Wakeups, Woken
from ._writer import Writer

#: The least time a cluster node's shutdown gives its "leaving" notice (else its
#: ``shutdown_timeout``), so that the others stop routing to it before it goes.
LEAVING_NOTICE = 0.25
#: The positional parameters of a server class's ``init`` (see `HasInit`). From
#: typing_extensions (Python 3.10's typing has no TypeVarTuple), and defined at run time
#: so that ``typing.get_type_hints`` works on `PersistentSupervisor.start`.
InitArgs = TypeVarTuple("InitArgs")

logger = logging.getLogger("trio_pgs")


class PersistentSupervisor:
    """An async context manager whose nursery runs every active server.

    ``name`` is what refs carry (one open supervisor per name per process). Server
    options given here (``idle_timeout=...``, ``restart=...``) override the classes'.
    ``servers`` lists the server classes it may activate; `start` and `ref` add more.
    ``shutdown_timeout`` bounds how long leaving the ``async with`` waits for
    handlers still running. ``max_restarts`` (off by default) escalates like OTP's
    supervisors: more than ``max_restarts`` crashes within ``max_seconds`` shut every
    server down cleanly and raise `SupervisorEscalated` out of the ``async with``.
    ``max_active`` (off by default) caps the active servers: above it, the least
    recently used idle servers hibernate early. ``on_event``, a plain callable, receives
    a `ServerEvent` for every activation, hibernation, crash, quarantine, stop and
    store transaction (for metrics; it runs on the trio thread and must not block; what
    it raises is logged and ignored).

    On entry, every stored, non-quarantined server of a `Restart.PERMANENT` class
    listed in ``servers`` is activated (in the background); others wake on demand.

    The store is opened on entry and closed on exit. Leaving the block (normally, by
    an exception or by cancellation) shuts every active server down: states stay in
    the store; the block's own exception comes out as itself.
    """

    def __init__(
        self,
        *,
        store: Store,
        name: str = "default",
        servers: Iterable[type[PersistentServer[Any]]] = (),
        shutdown_timeout: float = 5.0,
        max_restarts: int | None = None,
        max_seconds: float = 5.0,
        max_active: int | None = None,
        converter: cattrs.Converter | None = None,
        on_event: Callable[[ServerEvent], None] | None = None,
        cluster: Cluster | None = None,
        **defaults: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a supervisor name must be a non-empty str, not {name!r}")
        if not isinstance(store, Store):  # the five methods of the protocol
            raise TypeError(
                f"store {store!r} is not a trio_pgs.Store: it needs open(), close(), "
                "load(), commit() and scan()"
            )
        if not (isinstance(shutdown_timeout, int | float) and shutdown_timeout >= 0):
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, not {shutdown_timeout!r}")
        if max_restarts is not None and (not isinstance(max_restarts, int) or max_restarts < 0):
            raise ValueError(f"max_restarts must be an int >= 0 or None, not {max_restarts!r}")
        if max_active is not None and (not isinstance(max_active, int) or max_active < 1):
            raise ValueError(f"max_active must be an int >= 1 or None, not {max_active!r}")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be a callable taking a ServerEvent, not {on_event!r}")
        if not (isinstance(max_seconds, int | float) and max_seconds > 0):
            raise ValueError(f"max_seconds must be > 0, not {max_seconds!r}")
        if cluster is not None and not isinstance(cluster, Cluster):
            raise TypeError(f"cluster must be a trio_pgs.Cluster or None, not {cluster!r}")
        if cluster is not None and not isinstance(store, SupportsMembership):
            raise TypeError(
                f"cluster= needs a store that keeps members (PostgresStore); {store!r} "
                "serves one process"
            )
        check_option_names(defaults)
        resolve_options(PersistentServer, defaults)  # bad values fail here, not later
        self.name = name
        self.store = store
        self.shutdown_timeout = float(shutdown_timeout)
        self.max_restarts = max_restarts
        self.max_seconds = float(max_seconds)
        self.max_active = max_active
        #: With max_active: active entries from least to most recently used.
        self._recency: collections.OrderedDict[ServerRef, Entry] = collections.OrderedDict()
        self._recent_crashes: collections.deque[float] = collections.deque()
        self._escalation: SupervisorEscalated | None = None
        self._unflushed: tuple[str, ...] = ()
        self._converter = converter
        self._defaults = defaults
        self._kinds: dict[str, KindInfo] = {}
        self._entries: dict[ServerRef, Entry] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._all_ended: trio.Event | None = None
        self._settled: trio.Event | None = None
        self._writer_scope = trio.CancelScope(shield=True)
        self._context: Any = None
        #: A KeyboardInterrupt or SystemExit met by a server or a hook: raised out of
        #: the ``async with`` once everything is shut down.
        self._interruption: BaseException | None = None
        #: The end of the shutdown: its deadline plus TERMINATE_GRACE.
        self._grace_end: float | None = None
        #: The trio run the supervisor is open in: refs are usable from that run only.
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self.on_event = on_event
        #: The hook's tracing of messages, if it offers it (trio_pgs.otel.Telemetry).
        self._tracing: Tracing | None = on_event if isinstance(on_event, Tracing) else None
        if self._tracing is not None:  # wrapped here: nothing to check when not tracing
            self._deliver_call = traced_call(self._tracing, self._deliver_call)
            self._deliver_async = traced_async(self._tracing, self._deliver_async)
            self._deliver_stop = traced_stop(self._tracing, self._deliver_stop)
        self._writer = Writer(
            store, self._emit if on_event is not None else None, self._interrupt
        )
        self._reaper = IdleReaper()
        self._counters = Counters()
        self.cluster = cluster
        self._recovered_once = False
        #: This supervisor's membership of its name, on a store that keeps members.
        self._node: ClusterNode | None = None
        #: Wakes dormant servers whose reminders are due, on a store with a due index.
        self._wakeups: Wakeups | None = None
        self._host = _Host(self)
        for cls in servers:
            self._register(cls)

    def __repr__(self) -> str:
        return f"<PersistentSupervisor {self.name!r} on {self.store!r}>"

    # -- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> PersistentSupervisor:
        if self._context is not None:
            raise RuntimeError(f"{self!r} was already entered; create a new one")
        self._context = self._lifetime()
        return await self._context.__aenter__()  # type: ignore[no-any-return]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._context.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[PersistentSupervisor]:
        if self.name in open_supervisors:
            raise ValueError(
                f"a supervisor named {self.name!r} is already open in this process; "
                "give this one another name="
            )
        self._trio_token = trio.lowlevel.current_trio_token()
        open_supervisors[self.name] = self
        try:
            await self.store.open()
        except BaseException:
            del open_supervisors[self.name]
            raise
        body_error: BaseException | None = None
        refused: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                refused = await self._join(nursery)
                if refused is not None:  # raised below as itself, not in a group
                    nursery.cancel_scope.cancel()
                    return
                self._nursery = nursery
                nursery.start_soon(self._run_writer)
                nursery.start_soon(self._reaper.run)
                self._start_wakeups(nursery)
                if self._tracing is not None:
                    self._tracing.opened(self)
                nursery.start_soon(self._recover_permanent_servers)
                try:
                    yield self
                except BaseException as exc:  # re-raised as itself below
                    body_error = exc
                with trio.CancelScope(shield=True):
                    # One deadline for all of it: telling the others first comes out
                    # of shutdown_timeout (a database that does not answer included).
                    now = trio.current_time()
                    deadline = now + self.shutdown_timeout
                    if self._node is not None and self.cluster is not None:
                        # Hand off first; a moment at least, even with no timeout.
                        notice = max(deadline, now + LEAVING_NOTICE)
                        await self._node.announce_leaving(by=notice)
                    await self._shut_down(deadline)
                    await self._leave(deadline)
                nursery.cancel_scope.cancel()
        finally:
            self._closing = True
            del open_supervisors[self.name]
            if self._tracing is not None and self._nursery is not None:
                self._tracing.closed(self)
            await self._close_store()
            if refused is not None:
                raise refused
        if self._interruption is not None and self._interruption is not body_error:
            raise self._interruption from None
        if self._escalation is not None:
            raise self._escalation from (
                None if isinstance(body_error, trio.Cancelled) else body_error
            )
        if body_error is not None:
            raise body_error

    def _start_wakeups(self, nursery: trio.Nursery) -> None:
        """Reminders: wall-clock times follow trio's clock from now on; a store with a
        due index gets the task that wakes dormant servers (docs/reminders.md)."""
        self._host.wall_offset = _wall_offset()
        store = self.store
        if (
            isinstance(store, SupportsReminders) and keeps_reminders(store)
            and not getattr(store, "read_only", False)
        ):
            self._wakeups = Wakeups(
                store, lambda: list(self._kinds),
                lambda: trio.current_time() + self._host.wall_offset,
                self._wake_for_reminders,
            )
            nursery.start_soon(self._wakeups.run)

    def _wake_for_reminders(self, kind: str, key: str) -> Woken:
        """A dormant server has a reminder due: activate it (its activation delivers)."""
        ref = ServerRef(self.name, kind, key)
        if self._closing or self._nursery is None:
            return Woken.CLOSED
        if kind not in self._kinds or not self._host.owns(ref):
            return Woken.NOT_MINE
        if ref not in self._entries:
            self._counters.woken_by_reminders += 1
            self._entry(ref)
        return Woken.WOKEN

    async def _join(self, nursery: trio.Nursery) -> Exception | None:
        """On a store that keeps members: join the members of this name, and keep
        the lease. Returns why it cannot (`PersistenceError` if another process holds
        the name, an `OSError` if the cluster's address cannot be listened on)."""
        store = self.store
        if not isinstance(store, SupportsMembership) or getattr(store, "read_only", False):
            return None
        converter = self._converter or _wire_converter
        node = ClusterNode(self.cluster, store, self, converter.unstructure)
        try:
            await node.start(nursery)
        except Exception as exc:
            return exc
        self._node = node
        node.tracing = self._tracing
        self._host.owns = node.owns
        if self.cluster is not None:
            self._host.store_claim = node.guarded(self._host.store_claim)
        return None

    async def _leave(self, deadline: float) -> None:
        # Calls forwarded for tasks of this program get their replies until the
        # shutdown's deadline. Then a second of its own, even after a shutdown that
        # used all of its grace: a membership left behind holds the name (and, in a
        # cluster, the others' routes) until its lease runs out.
        if self._node is not None:
            try:
                await self._node.let_forwarded_end(by=deadline)
            finally:  # a Ctrl-C meanwhile: the node still leaves, then it propagates
                with trio.move_on_after(TERMINATE_GRACE):
                    await self._node.leave()

    async def _close_store(self) -> None:
        """Close the store by the end of the shutdown's grace (TERMINATE_GRACE after
        its deadline; TERMINATE_GRACE from now if the supervisor never ran). A store
        still busy with a commit abandoned at shutdown closes in its own time."""
        end = self._grace_end if self._grace_end is not None else (
            trio.current_time() + TERMINATE_GRACE
        )
        with trio.CancelScope(shield=True):
            # Never less than a moment: a healthy store closes in far less.
            with trio.move_on_at(max(end, trio.current_time() + 0.05)):
                await self.store.close()
                return
            logger.warning("supervisor %r: the store did not close by the end of the "
                           "shutdown (still busy); it finishes closing in the background",
                           self.name)

    @trio.lowlevel.enable_ki_protection
    async def _recover_permanent_servers(self) -> None:
        """Activate every stored server of the PERMANENT classes listed in servers=."""
        current_handling.set(None)
        for info in list(self._kinds.values()):
            if info.options.restart is not Restart.PERMANENT:
                continue
            count = 0
            async for record in self.store.scan(info.cls.kind):
                ref = ServerRef(self.name, record.kind, record.key)
                if (record.quarantined or self._closing or ref in self._entries
                        or not self._host.owns(ref)):  # another node's, in a cluster
                    continue
                self._entry(ref)
                count += 1
            if count:
                logger.info("supervisor %r: activated %d %s server(s) it owns now",
                            self.name, count, info.cls.kind)
        if isinstance(self.store, SupportsKinds) and not self._recovered_once:
            self._recovered_once = True  # in a cluster, this runs again at each change
            unserved = sorted(set(await self.store.kinds()) - set(self._kinds))
            if unserved:
                logger.warning(
                    "supervisor %r: the store holds records of kind(s) %s that no class "
                    "listed in servers= serves; they are left untouched",
                    self.name, ", ".join(unserved),
                )

    def _note_unflushed(self, ref: ServerRef) -> None:
        """A server whose last state could not be written at shutdown."""
        logger.error("%s: its last state could not be written at shutdown and is lost",
                     ref, extra={"kind": ref.kind, "key": ref.key})
        self._unflushed = (*self._unflushed, str(ref))

    def _emit(self, type: EventType, ref: ServerRef | None, **fields: Any) -> None:
        """Pass a `ServerEvent` to ``on_event``, if any. What it raises never reaches
        the caller (the writer, a server): an Exception is logged and ignored, a
        KeyboardInterrupt or SystemExit shuts the supervisor down."""
        if self.on_event is None:
            return
        try:
            event = ServerEvent(type, ref, trio.current_time(), supervisor=self.name, **fields)
            self.on_event(event)
        except Exception:
            logger.exception("supervisor %r: on_event raised (event: %s); ignored",
                             self.name, type.value)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit
            self._interrupt(exc)

    def _interrupt(self, exc: BaseException) -> None:
        """A KeyboardInterrupt or SystemExit: shut down as for leaving the block,
        then raise it as itself."""
        if self._interruption is None:
            self._interruption = exc
            logger.error("supervisor %r: %r; shutting down", self.name, exc)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    def _note_crash(self, ref: ServerRef, quarantined: bool, error: BaseException) -> None:
        """Count a crash; escalate when more than max_restarts fall within max_seconds."""
        self._counters.crashes += 1
        self._emit(EventType.CRASHED, ref, error=error)
        if quarantined:
            self._counters.quarantined += 1
            self._emit(EventType.QUARANTINED, ref, error=error)
        if self.max_restarts is None or self._escalation is not None:
            return
        now = trio.current_time()
        recent = self._recent_crashes
        recent.append(now)
        while recent and now - recent[0] > self.max_seconds:
            recent.popleft()
        if len(recent) > self.max_restarts:
            self._escalation = SupervisorEscalated(
                f"supervisor {self.name!r}: {len(recent)} crashes within "
                f"{self.max_seconds}s (max_restarts={self.max_restarts}), the last in "
                f"{ref}; every server was shut down and its state kept. Fix the cause "
                "and open the supervisor again"
            )
            logger.error("%s", self._escalation)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    @trio.lowlevel.enable_ki_protection
    async def _run_writer(self) -> None:
        current_handling.set(None)
        with self._writer_scope:
            await self._writer.run()

    async def _shut_down(self, deadline: float) -> None:
        """Every server shuts down within one deadline, *deadline* (``shutdown_timeout``
        from the start of the shutdown).

        Past it, handlers still running are cancelled (their callers are told nothing
        was committed), and the writer stops waiting for the store: callers whose
        commit was with the store are told its outcome is unknown. Cut-off servers'
        ``terminate`` hooks and closing the store then share TERMINATE_GRACE
        seconds."""
        self._closing = True
        self._grace_end = deadline + TERMINATE_GRACE
        for entry in list(self._entries.values()):
            entry.shutting_down = True
            entry.wake()
        with trio.move_on_at(deadline):
            await self._wait_all_ended()
            await self._writer.wait_idle()  # release(), rollback(): their commits
        if self._entries:
            self._cut_off_late_servers()
        self._writer_scope.cancel()
        with trio.move_on_at(self._grace_end):
            await self._wait_all_ended()

    def _cut_off_late_servers(self) -> None:
        late: dict[str, list[str]] = {"handling": [], "committing": [], "ending": []}
        for entry in self._entries.values():
            activation = entry.activation
            doing = "ending" if activation is None else activation.late_at_shutdown()
            late[doing].append(str(entry.ref))
            if entry.task_scope is not None:
                entry.task_scope.cancel()
        cut, waiting = sorted(late["handling"]), sorted(late["committing"])
        if cut:
            logger.error(
                "supervisor %r: %d server(s) still busy after shutdown_timeout=%ss were "
                "cancelled; their last changes were not committed: %s",
                self.name, len(cut), self.shutdown_timeout, ", ".join(cut[:20]),
            )
            self._unflushed = (*self._unflushed, *cut)
        if waiting:
            logger.error(
                "supervisor %r: %d server(s) were still waiting for the store after "
                "shutdown_timeout=%ss; their callers are told the outcome is unknown: %s",
                self.name, len(waiting), self.shutdown_timeout, ", ".join(waiting[:20]),
            )
        if late["ending"]:
            logger.warning(
                "supervisor %r: %d server(s) were still starting or ending after "
                "shutdown_timeout=%ss and were cancelled (nothing of theirs was lost)",
                self.name, len(late["ending"]), self.shutdown_timeout,
            )

    async def _wait_all_ended(self) -> None:
        while self._entries:
            self._all_ended = trio.Event()
            await self._all_ended.wait()

    def _forget(self, entry: Entry) -> None:
        """Called by an entry when it ends (synchronously, with an empty mailbox)."""
        if self._entries.get(entry.ref) is entry:
            del self._entries[entry.ref]
            self._recency.pop(entry.ref, None)
            self._reaper.forget(entry)
            if self._wakeups is not None:
                self._wakeups_ended(entry)
            if not self._entries and self._all_ended is not None:
                self._all_ended.set()
        self._note_settled(None)

    def _wakeups_ended(self, entry: Entry) -> None:
        """Tell the reminders' task that *entry* ended, and whether it left a reminder
        due (then, if it woke it, it tries again after a backoff)."""
        assert self._wakeups is not None
        kind, key = entry.ref.kind, entry.ref.key
        activation = entry.activation
        if activation is None and entry.start is not None:
            # A start refused with AlreadyStarted (`_runtime._refuse_start`): it
            # delivered nothing and tried nothing.
            self._wakeups.untried(kind, key)
            return
        due = None if activation is None else due_of(activation.record)
        if activation is not None and due is None:
            due = math.inf  # it has no reminder due (or is quarantined)
        self._wakeups.ended(kind, key, due)

    def _note_settled(self, entry: Entry | None) -> None:
        """A server began waiting for a message (or one ended): wake `_wait_settled`,
        and keep ``max_active`` as a bound once activity settles."""
        if self._settled is not None:
            self._settled.set()
            self._settled = None
        if self.max_active is not None and len(self._entries) > self.max_active:
            self._hibernate_least_recently_used(entry)

    async def _wait_settled(self) -> None:
        """Wait until some server begins waiting for a message or ends."""
        if self._settled is None:
            self._settled = trio.Event()
        await self._settled.wait()

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is None:
            raise SupervisorNotRunning(f"{self!r} is not open")
        self._nursery.start_soon(fn, *args)

    # -- the cluster's side (`_cluster.Local`) -----------------------------------------

    def _active_count(self) -> int:
        return len(self._entries)

    def _hand_off(self, mine: Callable[[ServerRef], bool]) -> int:
        """Ask the servers that another node owns now to hibernate (once idle); the
        messages that reach them meanwhile are sent on. Returns how many."""
        moved = 0
        for entry in list(self._entries.values()):
            if not mine(entry.ref) and not entry.hibernate_now:
                entry.hibernate_now = True
                entry.wake()
                moved += 1
        return moved

    async def _release(self, ref: ServerRef, within: float) -> None:
        """Another node takes *ref*: hibernate it here first (within *within* s)."""
        entry = self._entries.get(ref)
        if entry is None:
            return
        entry.hibernate_now = True
        entry.wake()
        with trio.move_on_after(within):
            while self._entries.get(ref) is entry:
                await self._wait_settled()

    def _serves(self, ref: ServerRef) -> bool:
        """Whether this node serves *ref*, and no other node may still run it (every
        ref, outside a cluster): while the members settle, a server this node gained
        may still be running where it was, handed off (its waits are asked there)."""
        return self._host.owns(ref) and (self._node is None or self._node.settled())

    def _waits(self, ref: ServerRef) -> list[ServerRef] | None:
        """What *ref* waits on now, if it runs here (None: not here)."""
        entry = self._entries.get(ref)
        return None if entry is None else list(entry.waiting_on)

    def _recover(self) -> None:
        """The members changed: recover the PERMANENT servers this node owns now."""
        if self._nursery is not None and not self._closing and any(
            info.options.restart is Restart.PERMANENT for info in self._kinds.values()
        ):
            self._nursery.start_soon(self._recover_permanent_servers)
        if self._wakeups is not None:
            self._wakeups.members_changed()

    def _stop_serving(self) -> None:
        """The lease is about to run out: every server hibernates now."""
        self._hand_off(lambda ref: False)

    async def _serve_remote(
        self, op: str, ref: ServerRef, payload: Any, chain: tuple[ServerRef, ...]
    ) -> Any:
        """A message from another node for *ref*, which this node serves (`routing.serve`)."""
        return await routing.serve(self, op, ref, payload, chain)

    async def _routed(self, ref: ServerRef, op: str, payload: Any) -> Any:
        """Deliver a message in a cluster (`routing.route`)."""
        assert self._node is not None
        return await routing.route(self, self._node, ref, op, payload)

    # -- registry ---------------------------------------------------------------------

    def _register(self, cls: type[PersistentServer[Any]]) -> KindInfo:
        if not (isinstance(cls, type) and issubclass(cls, PersistentServer)):
            raise TypeError(f"{cls!r} is not a PersistentServer subclass")
        kind = cls.kind
        info = self._kinds.get(kind)
        if info is not None:
            if info.cls is not cls:
                raise ValueError(
                    f"kind {kind!r} is already served by {info.cls.__qualname__} in "
                    f"supervisor {self.name!r}; give {cls.__qualname__} another kind"
                )
            return info
        check_shaping(cls)  # again: class attributes may have been set after the class
        options = resolve_options(cls, self._defaults)
        try:
            codec = Codec(
                cls.state_type,
                cls.converter or self._converter,
                options.state_version,
                cls.migrations,
                cls.persisted_type,
                cls.to_persisted,
                cls.from_persisted,
            )
        except TypeError as exc:
            raise TypeError(f"{cls.__qualname__} (kind {kind!r}): {exc}") from None
        info = KindInfo(cls, options, codec)
        self._kinds[kind] = info
        return info

    def ref(self, cls_or_kind: type[PersistentServer[Any]] | str, key: str) -> ServerRef:
        """The ref of server *key* of a class (registered here) or a registered kind.

        No I/O: the server may be dormant, or not exist (a message then raises
        `ServerNotFound`).
        """
        check_key(key)
        if isinstance(cls_or_kind, str):
            if cls_or_kind not in self._kinds:
                raise self._unknown_kind(cls_or_kind)
            return ServerRef(self.name, cls_or_kind, key)
        return ServerRef(self.name, self._register(cls_or_kind).cls.kind, key)

    def _unknown_kind(self, kind: str) -> UnknownKind:
        known = ", ".join(sorted(self._kinds)) or "none"
        return UnknownKind(
            f"supervisor {self.name!r} serves no kind {kind!r} (it serves: {known}); "
            "list its class in servers=[...]"
        )

    # -- messages ---------------------------------------------------------------------

    def _check_open(self) -> trio.Nursery:
        if self._nursery is None or self._closing:
            raise SupervisorNotRunning(
                f"supervisor {self.name!r} is not open (or is shutting down)"
            )
        return self._nursery

    def _entry(self, ref: ServerRef) -> Entry:
        entry = self._entries.get(ref)
        if entry is not None:
            return entry
        nursery = self._check_open()
        info = self._kinds.get(ref.kind)
        if info is None:
            raise self._unknown_kind(ref.kind)
        check_key(ref.key)  # a ref built by hand, or read from data
        return self._add(nursery, Entry(self._host, info, ref))

    def _add(self, nursery: trio.Nursery, entry: Entry) -> Entry:
        """Register a new entry (synchronously: racing callers share it) and start it."""
        self._entries[entry.ref] = entry
        nursery.start_soon(serve, entry)
        if self.max_active is not None:
            self._touch_recency(entry)
            self._hibernate_least_recently_used()
        return entry

    def _touch_recency(self, entry: Entry) -> None:
        """Mark *entry* as the most recently used (only kept with max_active)."""
        self._recency[entry.ref] = entry
        self._recency.move_to_end(entry.ref)

    def _hibernate_least_recently_used(self, settling: Entry | None = None) -> None:
        """Above max_active, ask the least recently used idle servers to hibernate now.
        Busy ones (handling, owing replies, committing) are skipped; they are asked
        again when a server next waits for a message. *settling* is about to wait."""
        assert self.max_active is not None
        excess = len(self._entries) - self.max_active
        for entry in self._recency.values():
            if excess <= 0:
                break
            if entry.hibernate_now:
                excess -= 1  # asked already
            elif (
                (entry is settling or entry.waiting())
                and entry.activation is not None and entry.activation.idle()
            ):
                entry.hibernate_now = True
                entry.wake()
                excess -= 1

    async def start(
        self,
        cls: type[HasInit[Callable[[Unpack[InitArgs]], Awaitable[Any]]]],
        *args: Unpack[InitArgs],
        key: str | None = None,
    ) -> ServerRef:
        """Create server *key* (a fresh UUID if None) with ``init(*args)``, commit its
        first state and activate it. Raises `AlreadyStarted` if *key* has a record.

        Type checkers check *args* against ``cls.init``, as trio's ``start_soon``
        checks its arguments against the function's (a list unpacked into fixed
        parameters is refused, its length being unknown: unpack a tuple)."""
        key = uuid.uuid4().hex if key is None else check_key(key)
        info = self._register(cast("type[PersistentServer[Any]]", cls))
        ref = ServerRef(self.name, info.cls.kind, key)
        if self._node is not None and self.cluster is not None:
            self._check_open()
            await self._routed(ref, "start", list(args))
            return ref
        await self._start_here(info, ref, args)
        return ref

    async def _start_here(self, info: KindInfo, ref: ServerRef, args: tuple[Any, ...]) -> None:
        handling = live_handling()
        if handling is None:
            await self._create(info, ref, args)
            return
        # From a handler: it waits on the new server's init and on_activate (an edge
        # of the wait-for graph while it lasts), so that a call back from them is a
        # cycle, not a deadlock.
        edge = WaitEdge(handling.waiting_on, ref)
        try:
            await self._create(info, ref, args)
        finally:
            edge.drop()

    async def _create(self, info: KindInfo, ref: ServerRef, args: tuple[Any, ...]) -> None:
        while (entry := self._entries.get(ref)) is not None:
            if entry.status is Status.ACTIVATING and not entry.activated.is_set():
                await entry.activated.wait()
                continue
            raise AlreadyStarted(f"{ref} is already started (it is active)", ref)
        nursery = self._check_open()
        slot = ReplySlot()
        self._add(nursery, Entry(self._host, info, ref, StartRequest(args, slot)))
        await slot.wait()

    async def _send(
        self, ref: ServerRef, kind: Kind, payload: Any, chain: tuple[ServerRef, ...] | None = None
    ) -> tuple[Entry, Message]:
        """Put a message in *ref*'s mailbox, waiting while it is full (backpressure).

        From inside a handler, a message that would wait on a server that waits on
        this one (through calls, or casts blocked on full mailboxes) raises
        `CallCycleError` instead: a call always, a cast only when it would block. While
        it waits, the wait is an edge of the wait-for graph."""
        await trio.lowlevel.checkpoint_if_cancelled()
        handling = live_handling()
        waits = kind is Kind.CALL or kind is Kind.STOP
        if chain is None:  # a cast waits on nobody: it carries no chain
            chain = check_no_deadlock(ref, handling) if handling is not None and waits else ()
        entry = self._entry(ref)
        slot = ReplySlot() if waits or kind is Kind.CRASH else None
        message = Message(kind, payload, slot, chain)
        if self._tracing is not None:
            message.trace = self._tracing.capture()
        try:
            entry.mailbox.send_nowait(message)
        except trio.WouldBlock:
            await self._send_blocked(entry, message, handling)
        else:
            if not waits:
                await trio.lowlevel.cancel_shielded_checkpoint()
        return entry, message

    async def _send_blocked(
        self, entry: Entry, message: Message, handling: Handling | None
    ) -> None:
        """The mailbox is full: wait for room (the one fallback of every send)."""
        if handling is None:
            await entry.mailbox.send(message)
            return
        waits = message.kind is Kind.CALL or message.kind is Kind.STOP
        if not waits:  # a cast about to block on a cycle
            if self._node is None:
                check_no_deadlock(entry.ref, handling)
            else:  # links of the chain on other nodes are asked of them
                await check_across(entry.ref, handling.chain, self._node.still_waits)
        edge = WaitEdge(handling.waiting_on, entry.ref)
        try:
            # A cast's wait ends once it is let in (the edge goes then); a call's goes
            # on, for the reply (its edge, added before this task resumes from here).
            await entry.mailbox.send(message, None if waits else edge.drop)
        finally:
            edge.drop()

    async def _deliver_call(self, ref: ServerRef, request: Any) -> Any:
        # The hot path: `_send` and `_wait_reply` for a call, inlined.
        if self.cluster is not None:
            return await self._routed(ref, "call", request)
        await trio.lowlevel.checkpoint_if_cancelled()
        handling = current_handling.get()  # live_handling(), inlined
        if handling is not None and not handling.live:
            handling = None
        chain = () if handling is None else check_no_deadlock(ref, handling)
        entry = self._entries.get(ref) or self._entry(ref)
        slot = ReplySlot()
        message = Message(Kind.CALL, request, slot, chain)
        if self._tracing is not None:
            message.trace = self._tracing.capture()
        if handling is None and message.trace is None:  # a traced one: a span around it
            activation = entry.activation
            if activation is not None and activation.inline and activation.handle_inline(message):
                return await slot.wait()  # handled here: its reply comes with the commit
        try:
            entry.mailbox.send_nowait(message)
        except trio.WouldBlock:
            await self._send_blocked(entry, message, handling)
        if handling is None:
            return await slot.wait()
        return await self._wait_reply(ref, entry, message)

    async def _wait_reply(self, ref: ServerRef, entry: Entry, message: Message) -> Any:
        slot = message.slot
        assert slot is not None
        handling = live_handling()
        if handling is None:
            return await slot.wait()
        edge = slot.edge = WaitEdge(handling.waiting_on, ref)
        try:
            return await slot.wait()
        finally:
            edge.drop()  # cancelled: this server no longer waits

    async def _deliver_async(self, ref: ServerRef, kind: str, payload: Any) -> None:
        """A cast or an info: accepted once queued and the server activated (a key
        with no record raises `ServerNotFound`)."""
        if self.cluster is not None:
            await self._routed(ref, kind, payload)
            return
        await self._deliver_async_here(ref, kind, payload)

    async def _deliver_async_here(
        self, ref: ServerRef, kind: str, payload: Any, chain: tuple[ServerRef, ...] | None = None
    ) -> None:
        entry, _ = await self._send(
            ref, Kind.CAST if kind == "cast" else Kind.INFO, payload, chain
        )
        if not entry.activated.is_set() and not await self._wait_activated(entry):
            return
        if entry.activation_error is not None:
            raise entry.activation_error()

    async def _wait_activated(self, entry: Entry) -> bool:
        """Wait for *entry*'s activation, unless the sender is a hook that the
        activation may be waiting on (its own `on_activate` casting to itself, or a
        server that `on_activate` calls): then the cast is accepted as queued, and
        False is returned. While it waits, the wait is an edge of the wait-for graph."""
        handling = live_handling()
        if handling is None:
            await entry.activated.wait()
            return True
        if would_deadlock(entry.ref, handling):
            await trio.lowlevel.checkpoint()
            return False
        edge = WaitEdge(handling.waiting_on, entry.ref)  # dropped by the activation
        if entry.activation_waits is None:
            entry.activation_waits = []
        entry.activation_waits.append(edge)
        try:
            await entry.activated.wait()
        finally:
            edge.drop()
        return True

    async def _deliver_crash(self, ref: ServerRef) -> None:
        """Make the server crash at its next message (trio_pgs.testing.crash): its
        `ServerCrashed` is the expected outcome; any other error (no such server, a
        quarantined one) is raised."""
        _, message = await self._send(ref, Kind.CRASH, None)
        assert message.slot is not None
        with contextlib.suppress(ServerCrashed):
            await message.slot.wait()

    async def _deliver_stop(self, ref: ServerRef, reason: str) -> None:
        if self.cluster is not None:
            await self._routed(ref, "stop", reason)
            return
        await self._wait_reply(ref, *await self._send(ref, Kind.STOP, reason))

    # -- quarantine ---------------------------------------------------------------------

    async def release(self, ref: ServerRef) -> None:
        """Lift *ref*'s quarantine and forget its recent crashes; the next message
        activates it from its last committed state."""
        if self.cluster is not None:  # on the node that owns it, which knows if it is active
            await self._routed(ref, "repair", ["release", 0])
            return
        await self._release_here(ref)

    async def _release_here(self, ref: ServerRef) -> None:
        await self._repair(ref, lambda record: next_version(record, quarantined=False,
                                                            crashes=()))
        logger.info("%s released from quarantine", ref, extra={"kind": ref.kind, "key": ref.key})
        if self._wakeups is not None:
            self._wakeups.kick()  # its reminders are due again (the missed ones folded)

    async def rollback(self, ref: ServerRef, steps: int = 1) -> None:
        """Restore the state committed *steps* writes before the current one, and lift
        the quarantine. Needs ``keep_history >= steps`` on the server class (only that
        many earlier states are kept) and a server that is not active."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, not {steps!r}")
        if self.cluster is not None:  # on the node that owns it, which knows if it is active
            await self._routed(ref, "repair", ["rollback", steps])
            return
        await self._rollback_here(ref, steps)

    async def _rollback_here(self, ref: ServerRef, steps: int) -> None:
        def rolled(record: Record) -> Record:
            if len(record.history) < steps:
                raise ValueError(
                    f"{ref} keeps {len(record.history)} earlier state(s), cannot roll back "
                    f"{steps}; set keep_history on {self._kinds[ref.kind].cls.__qualname__}"
                )
            return next_version(
                record,
                data=record.history[steps - 1],
                history=record.history[steps:],
                quarantined=False,
                crashes=(),
            )

        await self._repair(ref, rolled)
        logger.info("%s rolled back %d step(s)", ref, steps,
                    extra={"kind": ref.kind, "key": ref.key})
        if self._wakeups is not None:
            self._wakeups.kick()

    async def _repair(self, ref: ServerRef, change: Callable[[Record], Record]) -> None:
        """Commit *change* of *ref*'s stored record (a release, a rollback), one
        repair of a record at a time, while it is not active here. An activation of
        *ref* that begins meanwhile claims the record after it (`_Host.claim`): it runs
        from the repaired record, rather than fencing the repair off, or being fenced
        off by it while it answers from the record before. Another process's claim
        fences the repair's write off: it is done again on the record as it is then."""
        self._check_open()
        if ref.kind not in self._kinds:
            raise self._unknown_kind(ref.kind)
        repairs, name = self._host.repairs, (ref.kind, ref.key)
        while True:  # until neither a repair nor an activation is under way
            other = repairs.get(name)
            entry = self._entries.get(ref)
            if other is not None:
                await other.wait()
            elif (
                entry is not None and entry.status is Status.ACTIVATING
                and not entry.activated.is_set()  # set: re-activating, so active
            ):
                await entry.activated.wait()  # a quarantined server's ends at once
            elif entry is not None and entry.status is not Status.ENDED:
                raise ValueError(
                    f"{ref} is active; release and rollback apply to quarantined or "
                    "dormant servers"
                )
            else:
                break
        repairs[name] = done = trio.Event()  # no checkpoint since the look above
        try:
            for attempt in range(REPAIR_ATTEMPTS):
                # A claim: an activation of another process, or one left behind, is
                # fenced off.
                record = (await self._host.store_claim(ref.kind, ref.key)).record
                if record is None:
                    raise ServerNotFound(
                        f"{ref}: no such server (never started, or stopped normally)"
                    )
                try:
                    await self._writer.commit(Put(change(record), record.version))
                    return
                except ConflictError as exc:
                    if not exc.fenced or attempt == REPAIR_ATTEMPTS - 1:
                        raise
        finally:
            del repairs[name]
            done.set()

    # -- introspection ----------------------------------------------------------------

    def statistics(self) -> SupervisorStatistics:
        """A snapshot of the counters; cheap (no I/O; one look at each active server's
        mailbox)."""
        counters, writer = self._counters, self._writer
        return SupervisorStatistics(
            name=self.name,
            active=len(self._entries),
            activations=counters.activations,
            hibernations=counters.hibernations,
            crashes=counters.crashes,
            stops=counters.stops,
            messages=counters.messages,
            commits=writer.commits,
            records_written=writer.records_written,
            failed_commits=writer.failed,
            quarantined=counters.quarantined,
            migrations=counters.migrations,
            refusals=counters.refusals,
            unflushed=self._unflushed,
            fenced_writes=writer.fenced,
            reminders=counters.reminders,
            woken_by_reminders=counters.woken_by_reminders,
            queued=sum(len(e.mailbox) for e in self._entries.values()),
            **({} if self._node is None else attrs.asdict(self._node.statistics())),
        )


class _Host:
    """The supervisor as its servers' entries and activations see it (`Host`)."""

    __slots__ = (
        "counters", "max_active", "owns", "reaper", "reminders_kept", "repairs", "store",
        "store_claim", "sup", "touch", "tracing", "wall_offset", "writer",
    )

    def __init__(self, sup: PersistentSupervisor) -> None:
        self.sup = sup
        self.store = sup.store
        #: The store's claim (in a cluster, after the hand-over from another node).
        self.store_claim = claimer(sup.store)
        #: The records a release or rollback is changing now (`_repair`).
        self.repairs: dict[tuple[str, str], trio.Event] = {}
        self.owns: Callable[[ServerRef], bool] = _everywhere
        self.writer = sup._writer
        self.counters = sup._counters
        self.max_active = sup.max_active
        self.reaper = sup._reaper
        #: wall-clock time = trio time + wall_offset (set when the supervisor opens).
        self.wall_offset = 0.0
        self.tracing = sup._tracing
        self.reminders_kept = keeps_reminders(sup.store)
        # touch runs for every message: without max_active, it is the reaper's own.
        self.touch: Callable[[Entry, float | None], None] = (
            self.reaper.touch if self.max_active is None else self._touch_with_recency
        )

    async def claim(self, kind: str, key: str) -> Claim:
        """An activation's claim: after the repair of the record under way, if any."""
        repairs = self.repairs
        while (repair := repairs.get((kind, key))) is not None:
            await repair.wait()
        return await self.store_claim(kind, key)

    def _touch_with_recency(self, entry: Entry, idle_timeout: float | None) -> None:
        self.reaper.touch(entry, idle_timeout)
        self.sup._touch_recency(entry)

    def check_idle_at(self, entry: Entry, due: float) -> None:
        self.reaper.check_at(entry, due)

    def note_settled(self, entry: Entry | None = None) -> None:
        sup = self.sup
        if sup._settled is not None or self.max_active is not None:
            sup._note_settled(entry)

    def forget(self, entry: Entry) -> None:
        self.sup._forget(entry)

    def emit(self, type: EventType, ref: ServerRef | None, **fields: Any) -> None:
        self.sup._emit(type, ref, **fields)

    def note_crash(self, ref: ServerRef, quarantined: bool, error: BaseException) -> None:
        self.sup._note_crash(ref, quarantined, error)

    def note_unflushed(self, ref: ServerRef) -> None:
        self.sup._note_unflushed(ref)

    def interrupt(self, error: BaseException) -> None:
        self.sup._interrupt(error)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.sup._spawn(fn, *args)


def _everywhere(ref: ServerRef) -> bool:
    return True


#: How many times a release or rollback fenced off by a racing claim is done again.
REPAIR_ATTEMPTS = 5

#: Wall-clock time minus trio time, fixed for a whole trio run: every supervisor of
#: the run agrees, and under a virtual clock (trio.testing.MockClock) wall-clock time
#: moves with it, across a close and a reopen too.
_WALL_OFFSET: trio.lowlevel.RunVar[float] = trio.lowlevel.RunVar("trio_pgs_wall_offset")


def _wall_offset() -> float:
    try:
        return _WALL_OFFSET.get()
    except LookupError:
        offset = time.time() - trio.current_time()
        _WALL_OFFSET.set(offset)
        return offset


#: How messages crossing to other nodes are unstructured without a converter=.
_wire_converter = make_json_converter()
