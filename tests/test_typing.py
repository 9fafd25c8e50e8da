"""What the types promise: a server class names its state type (or stays generic), and
the handler result aliases are the unions they stand for."""

from __future__ import annotations

from typing import Any, TypeVar

import attrs
import pytest

import trio_pgs
from trio_pgs import MemoryStore, NoReply, PersistentServer, PersistentSupervisor, Reply, Stop

T = TypeVar("T")


@attrs.frozen
class Point:
    x: int
    y: int


class EchoBase(PersistentServer[T]):
    """A base class left generic in its state: each subclass names the type."""

    async def handle_call(self, request: object, state: T) -> trio_pgs.CallResult[T]:
        return Reply(state, state, persist=False)


async def state_after_a_restart(cls: type[PersistentServer[Any]], first: object) -> object:
    """The state a new supervisor loads from the store for a server started with *first*."""
    store = MemoryStore()
    async with PersistentSupervisor(store=store) as sup:
        await sup.start(cls, first, key="a")
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        return await sup.ref(cls, "a").call("get")


def test_a_server_without_a_state_type_is_refused_at_class_definition():
    with pytest.raises(TypeError) as caught:

        class Bare(PersistentServer):  # type: ignore[type-arg]
            pass

    message = str(caught.value)
    assert "Bare has no state type" in message
    assert "class Bare(PersistentServer[MyState])" in message
    assert "state_type = MyState" in message


def test_a_subclass_of_a_generic_base_without_a_type_argument_is_refused():
    with pytest.raises(TypeError, match="BareEcho has no state type"):

        class BareEcho(EchoBase):  # type: ignore[type-arg]
            pass


def test_a_subclass_that_stays_generic_is_allowed():
    S = TypeVar("S")

    class StillGeneric(EchoBase[S]):
        pass

    class PointEcho(StillGeneric[Point]):
        pass

    assert PointEcho.state_type is Point


async def test_a_type_argument_through_a_generic_base_decodes_the_state():
    class PointEcho(EchoBase[Point]):
        pass

    assert await state_after_a_restart(PointEcho, Point(1, 2)) == Point(1, 2)


async def test_a_state_type_attribute_stands_for_the_type_argument():
    class PointEcho(EchoBase):  # type: ignore[type-arg]
        state_type = Point

    assert await state_after_a_restart(PointEcho, Point(1, 2)) == Point(1, 2)


async def test_any_as_the_state_type_keeps_the_stored_json_shape():
    class AnyEcho(EchoBase[Any]):
        pass

    assert await state_after_a_restart(AnyEcho, Point(1, 2)) == {"x": 1, "y": 2}


async def test_a_subclass_of_a_server_inherits_its_state_type():
    class PointEcho(EchoBase[Point]):
        pass

    class LoudPointEcho(PointEcho):
        kind = "loud"

    assert await state_after_a_restart(LoudPointEcho, Point(1, 2)) == Point(1, 2)


def test_handler_result_aliases_are_the_unions_of_the_results():
    assert trio_pgs.CallResult[Point] == Reply[Point] | NoReply[Point] | Stop[Point]
    assert trio_pgs.CastResult[Point] == NoReply[Point] | Stop[Point]
