"""State shaping: types, ephemeral fields, transformations, converters, migrations."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
import re
import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import cattrs
import pytest
from cattrs.preconf.json import make_converter

import trio_pgs
import trio_pgs._encoding
import trio_pgs.testing
from trio_pgs import (
    ActivationFailed,
    MemoryStore,
    PersistentServer,
    PersistentSupervisor,
    Put,
    Record,
    Reply,
    ServerRef,
    StateEncodingError,
)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@attrs.frozen
class Inner:
    when: datetime.datetime
    tags: frozenset[str]


@attrs.define
class Mutable:
    inner: Inner
    blob: bytes
    color: Color
    friend: ServerRef | None = None
    counts: dict[str, int] = attrs.Factory(dict)


@dataclasses.dataclass
class Data:
    name: str
    scores: list[float]


WHEN = datetime.datetime(2026, 11, 24, 9, 30, tzinfo=datetime.timezone.utc)
CASES: list[tuple[Any, Any]] = [
    (int, 42),
    (str, "héllo"),
    (list[int], [1, 2, 3]),
    (dict[str, list[str]], {"a": ["b"]}),
    (Inner, Inner(WHEN, frozenset({"x", "y"}))),
    (Mutable, Mutable(Inner(WHEN, frozenset()), b"\x00\xff", Color.BLUE,
                      ServerRef("default", "k", "key"), {"a": 1})),
    (Data, Data("d", [1.5, 2.0])),
    (set[int], {3, 1, 2}),
    (tuple[Color, bytes], (Color.RED, b"raw")),
    # Ints past 64 bits: orjson refuses to write them and reads them as floats.
    (int, 2**70 + 1),
    (list[int], [-(2**64) - 3, 2**64, 12345678901234567890123]),
    (dict[int, str], {2**80: "big", 7: "small"}),
    (str, "1234567890123456789012"),  # digits in a string: read the same
]


def echo_server(state_type: Any, **attributes: Any) -> type[PersistentServer[Any]]:
    class Echo(PersistentServer[state_type]):  # type: ignore[valid-type]
        async def handle_call(self, request: Any, state: Any) -> Reply[Any]:
            if request == "get":
                return Reply(state, state)
            return Reply(None, request)  # anything else becomes the state

    for name, value in attributes.items():
        setattr(Echo, name, value)
    return Echo


@pytest.mark.parametrize(("state_type", "value"), CASES, ids=lambda c: repr(c)[:30])
async def test_states_round_trip_through_the_store(state_type, value):
    store, cls = MemoryStore(), echo_server(state_type)
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, value, key="k")
    async with PersistentSupervisor(store=store, servers=[cls]):
        got = await ref.call("get")
    assert got == value and type(got) is type(value)


@attrs.define
class Room:
    messages: list[str] = attrs.Factory(list)
    listeners: set[str] = trio_pgs.ephemeral(factory=set)
    lock_holder: str | None = trio_pgs.ephemeral(default=None)


class RoomServer(PersistentServer[Room]):
    async def handle_call(self, request: Any, state: Room) -> Reply[Room]:
        match request:
            case ("say", who, text):
                state.listeners.add(who)
                state.lock_holder = who
                state.messages.append(text)
                return Reply(len(state.messages), state)
            case "peek":
                return Reply(state, state)
        return await super().handle_call(request, state)


async def test_ephemeral_fields_are_not_stored_and_reset_on_activation(store):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(RoomServer, Room(), key="r")
        await ref.call(("say", "ann", "hi"))
        room = await ref.call("peek")
        assert room.listeners == {"ann"} and room.lock_holder == "ann"
    assert (await store.load("RoomServer", "r")).data == b'{"messages":["hi"]}'
    async with PersistentSupervisor(store=store, servers=[RoomServer]):
        room = await ref.call("peek")
    assert room == Room(["hi"], set(), None)


def test_ephemeral_needs_a_default():
    with pytest.raises(TypeError, match="exactly one"):
        trio_pgs.ephemeral()
    with pytest.raises(TypeError, match="exactly one"):
        trio_pgs.ephemeral(default=1, factory=list)


class Connection:
    """Something that cannot be stored."""

    def __init__(self, peer: str) -> None:
        self.peer = peer


@attrs.define
class Session:
    user: str
    connection: Connection
    seen: int = 0


@attrs.frozen
class StoredSession:
    user: str
    peer: str
    seen: int


class SessionServer(PersistentServer[Session]):
    persisted_type = StoredSession

    @staticmethod
    def to_persisted(state: Session) -> StoredSession:
        return StoredSession(state.user, state.connection.peer, state.seen)

    @staticmethod
    def from_persisted(stored: StoredSession) -> Session:
        return Session(stored.user, Connection(stored.peer), stored.seen)

    async def handle_call(self, request: Any, state: Session) -> Reply[Session]:
        state.seen += 1
        return Reply((state.user, state.connection.peer, state.seen), state)


async def test_transformation_functions_store_another_shape(store):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(SessionServer, Session("ann", Connection("10.0.0.1")), key="s")
        assert await ref.call("x") == ("ann", "10.0.0.1", 1)
    assert (await store.load("SessionServer", "s")).data == (
        b'{"user":"ann","peer":"10.0.0.1","seen":1}'
    )
    async with PersistentSupervisor(store=store, servers=[SessionServer]):
        assert await ref.call("x") == ("ann", "10.0.0.1", 2)


def test_transformations_go_together_and_are_static():
    with pytest.raises(TypeError, match="go together"):

        class Half(PersistentServer[int]):
            persisted_type = str

    with pytest.raises(TypeError, match="staticmethod"):

        class NotStatic(PersistentServer[int]):
            persisted_type = str

            def to_persisted(self, state):  # type: ignore[override]
                return str(state)

            from_persisted = staticmethod(int)


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and other.cents == self.cents


def money_converter() -> cattrs.Converter:
    converter = make_converter()
    converter.register_unstructure_hook(Money, lambda m: f"{m.cents / 100:.2f}")
    converter.register_structure_hook(Money, lambda v, _: Money(round(float(v) * 100)))
    return converter


@attrs.define
class Wallet:
    balance: Money


@pytest.mark.parametrize("where", ["class", "supervisor"])
async def test_a_users_converter_supplies_custom_hooks(store, where):
    cls = echo_server(Wallet, **({"converter": money_converter()} if where == "class" else {}))
    options = {"converter": money_converter()} if where == "supervisor" else {}
    async with PersistentSupervisor(store=store, **options) as sup:
        ref = await sup.start(cls, Wallet(Money(1250)), key="w")
    assert (await store.load("Echo", "w")).data == b'{"balance":"12.50"}'
    async with PersistentSupervisor(store=store, servers=[cls], **options):
        assert await ref.call("get") == Wallet(Money(1250))


@attrs.define
class Votes:
    tally: dict[bool, int]


@attrs.define
class Scores:
    by_level: list[dict[int | None, str]]


@dataclasses.dataclass
class VotesData:
    tally: dict[bool, int]


class VotesDict(typing.TypedDict):
    tally: dict[bool, int]


Flag = typing.NewType("Flag", bool)
T = typing.TypeVar("T")


@attrs.define
class Keyed(typing.Generic[T]):
    by: dict[T, int]


@attrs.define
class Nested(typing.Generic[T]):
    inner: Keyed[T]


@attrs.define
class Flags(Keyed[bool]):  # the type argument given by a base
    pass


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@pytest.mark.parametrize(("state_type", "path"), [
    (dict[bool, int], "$"),
    (Votes, "$.tally"),
    (VotesData, "$.tally"),
    (VotesDict, "$.tally"),
    (dict[Flag, int], "$"),
    (Keyed[bool], "$.by"),
    (Keyed[str | None], "$.by"),
    (Nested[bool], "$.inner.by"),
    (dict[typing.Annotated[bool, "flag"], int], "$"),
    (Flags, "$.by"),
    (typing.Counter[bool], "$"),
    (dict[Priority, list[str]], "$"),  # "2" reads back as no Priority
    (dict[Literal[1, 2], str], "$"),
    (Scores, "$.by_level[...]"),
    (dict[str, dict[Literal[True, "x"], int]], "$[...]"),
    (typing.Optional[Mapping[typing.Optional[str], int]], "$[...]"),  # noqa: UP045
])
async def test_dict_keys_that_may_be_bool_or_none_are_refused_at_registration(
    state_type, path
):
    """JSON keeps keys as strings: the default converter read "false" back as True
    (a committed state changed) and could not read "null" as None (a committed state
    no activation could read). Such a state type is refused when it is registered."""
    with pytest.raises(TypeError, match=r"Echo \(kind 'Echo'\): the state's dict at "
                       + re.escape(path) + " has keys (that may be bool or None|of an? )"):
        PersistentSupervisor(store=MemoryStore(), servers=[echo_server(state_type)])


def test_types_with_string_int_and_enum_keys_are_accepted():
    for state_type in (Keyed[str], Nested[int], dict[Color, int], dict[str, bool],
                       dict[Literal["a", "b"], int], typing.Counter[str],
                       dict[typing.NewType("Name", str), int], Keyed[int] | None, Any):
        trio_pgs._encoding.Codec(state_type, None, 1, {})


def test_many_state_types_are_each_checked():
    """Each of 60 fresh types holding a dict[bool, int] is refused: the check once
    took a type whose id a freed one had had for one it had already seen."""
    for i in range(60):
        cls = attrs.define(type(f"S{i}", (), {"__annotations__": {"m": "dict[bool, int]"}}))
        with pytest.raises(TypeError, match="keys that may be bool or None"):
            trio_pgs._encoding.Codec(cls, None, 1, {})


async def test_an_infinite_float_key_is_refused_as_an_infinite_value_is():
    """orjson wrote an infinite dict key as "null": an acknowledged state no activation
    could read. It is refused as an infinite value is (`StateEncodingError`)."""
    cls = echo_server(dict[float, str])
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(cls, {1.5: "low"}, key="k")
        with pytest.raises(StateEncodingError):
            await ref.call({math.inf: "max"})
        assert await ref.call("get") == {1.5: "low"}


async def test_a_converter_of_ones_own_may_keep_bool_keys():
    converter = make_converter()
    converter.register_structure_hook_func(
        lambda tp: tp == dict[bool, int],
        lambda raw, _: {key == "true": value for key, value in raw.items()},
    )
    store, cls = MemoryStore(), echo_server(dict[bool, int], converter=converter)
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, {False: 2, True: 1}, key="k")
    async with PersistentSupervisor(store=store, servers=[cls]):
        assert await ref.call("get") == {False: 2, True: 1}


# -- migrations -------------------------------------------------------------------------


@attrs.define
class PlayerV3:
    name: str
    score: int
    level: int


def v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    return {"name": raw["nick"], "score": raw["points"]}


def v2_to_v3(raw: dict[str, Any]) -> dict[str, Any]:
    return {**raw, "level": raw["score"] // 100}


def player_server(version: int, migrations: dict[int, Any]) -> type[PersistentServer[Any]]:
    return echo_server(PlayerV3, kind="player", state_version=version, migrations=migrations)


async def test_a_migration_chain_runs_in_order_and_is_committed_back(store):
    await store.commit([Put(Record(
        kind="player", key="p", data=b'{"nick":"ann","points":250}', version=1, state_version=1,
    ), 0)])
    cls = player_server(3, {1: v1_to_v2, 2: v2_to_v3})
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        assert await sup.ref(cls, "p").call("get") == PlayerV3("ann", 250, 2)
        assert sup.statistics().migrations == 1
    record = await store.load("player", "p")
    assert record.state_version == 3
    assert record.data == b'{"name":"ann","score":250,"level":2}'
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        assert await sup.ref(cls, "p").call("get") == PlayerV3("ann", 250, 2)
        assert sup.statistics().migrations == 0  # already at version 3


async def test_migrations_carry_across_deploys_one_version_at_a_time(store):
    @attrs.define
    class PlayerV2:
        name: str
        score: int

    v1 = echo_server(dict[str, Any], kind="player")
    v2 = echo_server(PlayerV2, kind="player", state_version=2, migrations={1: v1_to_v2})
    v3 = player_server(3, {1: v1_to_v2, 2: v2_to_v3})
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(v1, {"nick": "bob", "points": 120}, key="p")
    async with PersistentSupervisor(store=store, servers=[v2]):
        assert await ref.call("get") == PlayerV2("bob", 120)
    async with PersistentSupervisor(store=store, servers=[v3]):
        assert await ref.call("get") == PlayerV3("bob", 120, 1)


async def test_a_rollback_after_a_migration_restores_an_earlier_state_migrated(store):
    """The states kept for rollback are migrated with the record's: a rollback across
    a migration restores the earlier state in the current shape (it wrote the old
    bytes under the new state_version, and the server could never activate again)."""
    v1 = echo_server(dict[str, Any], kind="player", keep_history=3)
    v2 = player_server(3, {1: v1_to_v2, 2: v2_to_v3})
    v2.keep_history = 3
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(v1, {"nick": "ann", "points": 100}, key="p")
        await ref.call({"nick": "ann", "points": 150})
    async with PersistentSupervisor(store=store, servers=[v2]) as sup:
        assert await ref.call("get") == PlayerV3("ann", 150, 1)  # migrated
        await ref.call(PlayerV3("ann", 999, 9))
        await trio_pgs.testing.hibernate(ref)
        await sup.rollback(ref, steps=2)  # back past the migration
        assert await ref.call("get") == PlayerV3("ann", 100, 1)


async def test_a_migration_that_returns_none_is_named(store):
    """A migration with no return statement: the error says so, not only cattrs'
    "expected ... @ $"."""
    await store.commit([Put(Record(
        kind="player", key="p", data=b'{"nick":"ann","points":1}', version=1,
        state_version=1,
    ), 0)])
    cls = player_server(2, {1: lambda raw: None})
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        with pytest.raises(ActivationFailed, match=r"migration 1 -> 2 returned None"):
            await sup.ref(cls, "p").call("get")


async def test_a_failing_migration_fails_activation_and_keeps_the_record(store):
    def broken(raw: Any) -> Any:
        raise KeyError("points")

    await store.commit([Put(Record(
        kind="player", key="p", data=b'{"nick":"ann"}', version=1, state_version=1,
    ), 0)])
    cls = player_server(2, {1: broken})
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        with pytest.raises(ActivationFailed, match=r"migration 1 -> 2 raised KeyError"):
            await sup.ref(cls, "p").call("get")
    assert (await store.load("player", "p")).data == b'{"nick":"ann"}'


async def test_a_record_from_the_future_names_both_versions(store):
    await store.commit([Put(Record(
        kind="player", key="p", data=b"{}", version=1, state_version=5,
    ), 0)])
    cls = player_server(3, {1: v1_to_v2, 2: v2_to_v3})
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        with pytest.raises(ActivationFailed, match=r"state_version 5, newer than .* 3"):
            await sup.ref(cls, "p").call("get")


async def test_a_missing_migration_step_names_both_versions(store):
    await store.commit([Put(Record(
        kind="player", key="p", data=b"{}", version=1, state_version=1,
    ), 0)])
    cls = player_server(3, {2: v2_to_v3})
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        with pytest.raises(ActivationFailed, match=r"version 1, the code at 3.*migrations\[1\]"):
            await sup.ref(cls, "p").call("get")


async def test_a_decoding_error_names_the_server_and_the_field_path(store):
    bad = b'{"name":"ann","score":"lots","level":1}'
    await store.commit([Put(Record(kind="player", key="p", data=bad), 0)])
    cls = player_server(1, {})
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        with pytest.raises(ActivationFailed, match=r"player/p.*expected int @ \$\.score"):
            await sup.ref(cls, "p").call("get")


def test_migrations_must_map_ints_to_functions(store):
    with pytest.raises(TypeError, match="migrations"):
        PersistentSupervisor(store=store, servers=[player_server(2, {"1": v1_to_v2})])


async def test_a_ref_with_an_unknown_kind_imports_nothing(store, monkeypatch):
    import builtins

    imported = []
    real_import = builtins.__import__

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        imported.append(name)
        return real_import(name, *args, **kwargs)

    async with PersistentSupervisor(store=store) as sup:
        ref = ServerRef(sup.name, "os.path", "k")
        monkeypatch.setattr(builtins, "__import__", spy)
        with pytest.raises(trio_pgs.UnknownKind):
            await ref.call("get")
        monkeypatch.setattr(builtins, "__import__", real_import)
    assert "os.path" not in imported and "os" not in imported


# -- the JSON backends --------------------------------------------------------------------


@pytest.mark.parametrize(("state_type", "value"), [*CASES, (dict[int, str], {1: "a", 2: "b"})],
                         ids=lambda c: repr(c)[:30])
def test_json_and_orjson_backends_write_the_same_bytes(state_type, value, monkeypatch):
    pytest.importorskip("orjson")
    from trio_pgs import _encoding

    codec = _encoding.Codec(state_type, None, 1, {})
    monkeypatch.setattr(_encoding, "JSON_BACKEND", "json")
    with_json = codec.encode(value, "k/key")
    monkeypatch.setattr(_encoding, "JSON_BACKEND", "orjson")
    with_orjson = codec.encode(value, "k/key")
    if state_type in (set[int],) or "frozenset" in repr(value):
        assert sorted(with_json) == sorted(with_orjson)  # set order may differ
    else:
        assert with_json == with_orjson
    assert codec.decode(with_json, 1, "k/key")[0] == value


@pytest.mark.parametrize("backend", ["json", "orjson"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_infinity_are_refused_by_both_backends(backend, bad, monkeypatch):
    pytest.importorskip("orjson")
    from trio_pgs import StateEncodingError, _encoding

    monkeypatch.setattr(_encoding, "JSON_BACKEND", backend)
    codec = _encoding.Codec(list[float], None, 1, {})
    with pytest.raises(StateEncodingError, match=r"\$\[1\]"):
        codec.encode([1.0, bad], "k/key")


def test_small_encoded_states_hold_no_spare_buffer():
    import tracemalloc

    from trio_pgs._encoding import dumps

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [dumps({"n": i}) for i in range(100)]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert held < 512  # orjson's results keep a 4 KiB buffer unless copied
