"""`PersistentServer`: the hooks a user writes, and the options a class declares."""

from __future__ import annotations

import enum
import inspect
import logging
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import attrs
import cattrs
import trio

from ._errors import UnknownRequest
from ._reminding import ReminderBook
from ._results import CallResult, CastResult, NoReply

if TYPE_CHECKING:
    import datetime

    from ._ref import ServerRef


class _Running(Protocol):
    """What a server instance reaches of the activation it runs in."""

    @property
    def ref(self) -> ServerRef: ...

    @property
    def book(self) -> ReminderBook: ...

    def send_after(self, delay: float, info: Any) -> None: ...

S = TypeVar("S")
Init_co = TypeVar("Init_co", covariant=True)
logger = logging.getLogger("trio_pgs.server")


class Restart(enum.Enum):
    """What a crash or a stop does to the stored record (OTP's restart strategies)."""

    #: Never restarted. A crash or any stop wipes the record.
    TEMPORARY = "temporary"
    #: A crash keeps the record and the next message activates it; a normal stop wipes it.
    TRANSIENT = "transient"
    #: A crash or an abnormal stop restarts it at once; a normal stop wipes it.
    PERMANENT = "permanent"


class HasInit(Protocol[Init_co]):
    """For type checkers only: a class whose ``init``, bound, is an *Init_co*.
    `PersistentSupervisor.start` is typed ``type[HasInit[Callable[[*Args],
    Awaitable[Any]]]]`` with ``*args: *Args``, so that mypy and pyright check the
    arguments of ``start`` against the class's ``init`` (its defaults and ``*args``
    included). ``init`` is matched as a callable attribute, not as a method, because
    inferring a TypeVarTuple from a protocol's method ignores its defaults. A class
    without a server's ``ref`` is refused as well (not ``restart``: pyright refuses a
    class attribute declared ``ClassVar`` for a protocol's property)."""

    @property
    def ref(self) -> ServerRef: ...

    @property
    def init(self) -> Init_co: ...


class Persistence(enum.Enum):
    """When a server's state is written to the store."""

    #: Committed after every handled message, before the reply (the default).
    EACH_MESSAGE = "each_message"
    #: Replies at once; the newest state is committed at most ``max_lag`` seconds later,
    #: and always at hibernation, stop, crash (the state before it) and shutdown.
    WRITE_BEHIND = "write_behind"
    #: Committed only at hibernation, stop, crash (the state before it) and shutdown.
    ON_STOP = "on_stop"


_HOOKS = ("init", "on_activate", "handle_call", "handle_cast", "handle_info", "terminate")


def _check_positive_or_none(name: str, value: object) -> None:
    if value is not None:
        _check_positive(name, value, or_none=True)


def _check_positive(name: str, value: object, or_none: bool = False) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        allowed = " or None" if or_none else ""
        raise TypeError(f"{name} must be a number of seconds{allowed}, not {value!r}")
    if value != value or value <= 0:  # NaN
        allowed = " (or None for never)" if or_none else ""
        raise ValueError(f"{name} must be > 0{allowed}, not {value!r}")
    _check_float(name, value)


def _check_float(name: str, value: int | float) -> None:
    """trio's clock is a float: an int past its range (10**400) would overflow later,
    in a timer or the idle reaper, not here."""
    try:
        float(value)
    except OverflowError:
        raise ValueError(
            f"{name} must be a number of seconds a float holds (math.inf for never), "
            f"not an int of {int(value).bit_length()} bits"
        ) from None


#: The largest state_version: what a signed 64-bit integer column holds.
_MAX_STATE_VERSION = 2**63 - 1


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, not {value!r}")


@attrs.frozen
class Options:
    """The resolved options of one server class under one supervisor."""

    idle_timeout: float | None = 300.0
    mailbox_size: int = 1024
    restart: Restart = Restart.TRANSIENT
    persistence: Persistence = Persistence.EACH_MESSAGE
    max_crashes: int = 3
    crash_window: float = 5.0
    state_version: int = 1
    keep_history: int = 0
    max_lag: float = 1.0

    def __attrs_post_init__(self) -> None:
        _check_positive_or_none("idle_timeout", self.idle_timeout)
        _check_count("mailbox_size", self.mailbox_size)
        if not isinstance(self.restart, Restart):
            raise TypeError(f"restart must be a trio_pgs.Restart, not {self.restart!r}")
        if not isinstance(self.persistence, Persistence):
            raise TypeError(
                f"persistence must be a trio_pgs.Persistence, not {self.persistence!r}"
            )
        _check_count("max_crashes", self.max_crashes)
        _check_positive_or_none("crash_window", self.crash_window)
        _check_count("state_version", self.state_version)
        if self.state_version > _MAX_STATE_VERSION:
            # Stores keep it in a 64-bit integer: PostgreSQL would refuse the statement
            # of a whole batch for it, and the other servers' writes with it.
            raise ValueError(
                f"state_version must be at most {_MAX_STATE_VERSION} (stores keep it in a "
                f"64-bit integer), not {self.state_version!r}"
            )
        _check_positive_or_none("max_lag", self.max_lag)
        if self.max_lag is None:
            raise ValueError("max_lag must be a number of seconds (use ON_STOP for never)")
        if not isinstance(self.keep_history, int) or self.keep_history < 0:
            raise ValueError(f"keep_history must be an int >= 0, not {self.keep_history!r}")


OPTION_NAMES = frozenset(field.name for field in attrs.fields(Options))


def resolve_options(cls: type[PersistentServer[Any]], overrides: Mapping[str, Any]) -> Options:
    """The class's options, with the supervisor's *overrides* on top."""
    values = {name: getattr(cls, name) for name in OPTION_NAMES}
    values.update(overrides)
    try:
        return Options(**values)
    except (TypeError, ValueError) as exc:
        if cls is PersistentServer:  # the supervisor's own keyword arguments
            raise
        raise type(exc)(f"{cls.__qualname__} (kind {cls.kind!r}): {exc}") from None


def check_option_names(names: typing.Iterable[str]) -> None:
    unknown = sorted(set(names) - OPTION_NAMES)
    if unknown:
        raise TypeError(
            f"unknown server option(s) {', '.join(unknown)}; "
            f"the options are {', '.join(sorted(OPTION_NAMES))}"
        )


class PersistentServer(Generic[S]):
    """Base class of a persistent server whose state is of type ``S``.

    Subclass it as ``class PlayerServer(PersistentServer[Player])`` and write the hooks
    as ``async def``. The supervisor creates one instance per activation (with no
    arguments); the state is what is persisted, the instance is not.

    Class attributes are the options (a supervisor's options override them): ``kind``
    (the name stored in refs and records; the class name by default),
    ``idle_timeout``, ``mailbox_size``, ``restart``, ``persistence``, ``max_crashes``,
    ``crash_window``, ``state_version``, ``keep_history`` and ``max_lag``.

    State shaping (class attributes only): ``migrations`` maps each ``state_version``
    migrated from to a function of the unstructured state; ``converter`` is a cattrs
    converter for this class (before the supervisor's); ``persisted_type`` with the
    functions ``to_persisted`` (live state to persisted shape) and ``from_persisted``
    (back) stores a different shape than the live state (write them as
    ``staticmethod``).
    """

    kind: ClassVar[str]
    state_type: ClassVar[Any] = Any
    idle_timeout: ClassVar[float | None] = 300.0
    mailbox_size: ClassVar[int] = 1024
    restart: ClassVar[Restart] = Restart.TRANSIENT
    persistence: ClassVar[Persistence] = Persistence.EACH_MESSAGE
    max_crashes: ClassVar[int] = 3
    crash_window: ClassVar[float] = 5.0
    state_version: ClassVar[int] = 1
    keep_history: ClassVar[int] = 0
    max_lag: ClassVar[float] = 1.0
    migrations: ClassVar[Mapping[int, Callable[[Any], Any]]] = {}
    converter: ClassVar[cattrs.Converter | None] = None
    persisted_type: ClassVar[Any] = None
    to_persisted: ClassVar[Callable[[Any], Any] | None] = None
    from_persisted: ClassVar[Callable[[Any], Any] | None] = None

    _activation: _Running
    # Whether state_type was given (a type argument for S, or the attribute) on this class
    # or an ancestor; while it was not, _state_parameter is the TypeVar standing for S
    # (None: the first type parameter, as in PersistentServer itself).
    _has_state_type: ClassVar[bool] = False
    _state_parameter: ClassVar[TypeVar | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            cls.kind = cls.__name__
        check_kind(cls.kind)
        find_state_type(cls)
        check_shaping(cls)
        for name in _HOOKS:
            hook = getattr(cls, name)
            if not inspect.iscoroutinefunction(hook):
                raise TypeError(
                    f"{cls.__qualname__}.{name} must be an 'async def' method "
                    f"(it is {hook!r})"
                )

    @property
    def ref(self) -> ServerRef:
        """This server's own ref."""
        return self._activation.ref

    def send_after(self, delay: float, info: Any) -> None:
        """Deliver *info* to `handle_info` after *delay* seconds (a number > 0), if
        still active.

        The timer is volatile: it is dropped when the server hibernates, stops or
        crashes, and does not keep the server awake (re-arm it in `on_activate`).
        """
        _check_positive("delay", delay)
        self._activation.send_after(delay, info)

    def remind(
        self,
        name: str,
        *,
        at: datetime.datetime | float | None = None,
        after: float | None = None,
        every: float | None = None,
        payload: Any = None,
    ) -> None:
        """Set the durable reminder *name* (replacing one of that name): at *at* (an
        aware datetime, or a timestamp as `time.time`), or *after* seconds, then every
        *every* seconds if given (with *every* alone, the first is *every* seconds
        from now). When due, `handle_info` receives a `trio_pgs.Reminder`, the server
        being activated for it if it is dormant.

        Committed with the state of the message that sets it: a crash drops it, as it
        drops the state. *payload* is plain JSON data. Works in ``init`` too (the
        reminder is created with the server). See docs/reminders.md.
        """
        self._activation.book.remind(name, at, after, every, payload)

    def cancel_reminder(self, name: str) -> None:
        """Cancel the reminder *name*, if set (committed like `remind`)."""
        self._activation.book.cancel(name)

    # **kwargs too: a signature of (*args: Any, **kwargs: Any) is one that any override
    # matches, for pyright as for mypy (start() passes positional arguments only).
    async def init(self, *args: Any, **kwargs: Any) -> S:
        """Return the first state from the arguments of `PersistentSupervisor.start`.

        The default accepts one argument and uses it as the state.
        """
        if len(args) != 1:
            raise TypeError(
                f"{type(self).__qualname__} has no init(); the default init takes the "
                f"initial state as its one argument, but start() got {len(args)}"
            )
        await trio.lowlevel.checkpoint()
        return typing.cast(S, args[0])

    async def on_activate(self, state: S) -> S:
        """Called on every activation (the first too) with the stored state; returns
        the state to run with. Re-arm timers and re-open ephemeral resources here."""
        await trio.lowlevel.checkpoint()
        return state

    async def handle_call(self, request: Any, state: S) -> CallResult[S]:
        """Answer a `ServerRef.call`. The default crashes with `UnknownRequest`."""
        raise UnknownRequest(
            f"{self.ref}: {type(self).__qualname__} does not handle the call {request!r}; "
            "define handle_call"
        )

    async def handle_cast(self, message: Any, state: S) -> CastResult[S]:
        """Handle a `ServerRef.cast`. The default crashes with `UnknownRequest`."""
        raise UnknownRequest(
            f"{self.ref}: {type(self).__qualname__} does not handle the cast {message!r}; "
            "define handle_cast"
        )

    async def handle_info(self, message: Any, state: S) -> CastResult[S]:
        """Handle `ServerRef.send` and `send_after`. The default logs and ignores it."""
        logger.warning(
            "%s ignored the info %r (define handle_info)", self.ref, message,
            extra={"kind": self.ref.kind, "key": self.ref.key},
        )
        await trio.lowlevel.checkpoint()
        return NoReply(state, persist=False)

    async def terminate(self, reason: Any, state: S) -> None:
        """Called when the activation ends: ``"normal"`` or another stop reason,
        ``"hibernate"``, ``"shutdown"``, or the exception that crashed it."""
        await trio.lowlevel.checkpoint()


def find_state_type(cls: type[PersistentServer[Any]]) -> None:
    """Set ``cls.state_type`` from its bases' type arguments, following the state's
    TypeVar through generic subclasses (``class Base(PersistentServer[T])``, then
    ``class Server(Base[Player])``). A class that is not generic and has no state type
    is refused: its state would come back from the store as plain dicts and lists."""
    if "state_type" in cls.__dict__:
        cls._has_state_type = True
        return
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if not (isinstance(origin, type) and issubclass(origin, PersistentServer)):
            continue
        if origin._has_state_type:
            return
        parameters = getattr(origin, "__parameters__", ())
        parameter = origin._state_parameter or next(iter(parameters), None)
        if parameter not in parameters:
            continue
        argument = typing.get_args(base)[parameters.index(parameter)]
        if isinstance(argument, TypeVar):
            cls._state_parameter = argument
        else:
            cls.state_type = argument
            cls._has_state_type = True
        return
    if not cls._has_state_type and not getattr(cls, "__parameters__", ()):
        raise TypeError(
            f"{cls.__qualname__} has no state type: without one, its state comes back "
            f"from the store as plain dicts and lists. Give it as the type argument, "
            f"class {cls.__name__}(PersistentServer[MyState]) (PersistentServer[Any] to "
            f"keep the stored JSON shape), or set state_type = MyState in the class"
        )


def check_shaping(cls: type[PersistentServer[Any]]) -> None:
    shaping = (cls.persisted_type, cls.to_persisted, cls.from_persisted)
    if any(part is not None for part in shaping) and any(part is None for part in shaping):
        raise TypeError(
            f"{cls.__qualname__}: persisted_type, to_persisted and from_persisted go "
            "together; define all three (or none)"
        )
    for name in ("to_persisted", "from_persisted"):
        if inspect.isfunction(inspect.getattr_static(cls, name)):
            raise TypeError(f"{cls.__qualname__}.{name} must be a @staticmethod")
    if not isinstance(cls.migrations, Mapping) or not all(
        isinstance(version, int) and callable(step) for version, step in cls.migrations.items()
    ):
        raise TypeError(
            f"{cls.__qualname__}.migrations must map each version migrated from (an int) "
            "to a function taking and returning the unstructured state"
        )


def check_kind(kind: object) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"a server kind must be a str, not {kind!r}")
    if not kind or not kind.isprintable():
        raise ValueError(f"a server kind must be non-empty and printable, not {kind!r}")
    return kind

