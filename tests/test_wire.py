"""What crosses between cluster nodes (`_wire`), and who owns a server (`_placement`)."""

from __future__ import annotations

import math
from collections import Counter

import attrs
import pytest
from cattrs.preconf.json import make_converter
from hypothesis import given
from hypothesis import strategies as st

import trio_pgs
from trio_pgs import _wire as wire
from trio_pgs._placement import owner

unstructure = make_converter().unstructure

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


def across(value):
    """*value* as the other node gets it."""
    return wire.unpack(wire.decode(wire.encode({"v": wire.pack(value, unstructure)}))["v"])


@given(plain)
def test_plain_data_arrives_as_it_was_sent_tuples_included(value):
    assert across(value) == value
    assert _shape(across(value)) == _shape(value)


def _shape(value):
    if isinstance(value, tuple | list):
        return (type(value), [_shape(item) for item in value])
    if isinstance(value, dict):
        return (dict, {name: _shape(item) for name, item in value.items()})
    return type(value)


def test_dicts_that_look_like_tags_arrive_unchanged():
    for value in ({"\0t": [1, 2]}, {"\0d": {"a": 1}}, {"\0x": 1, "b": (1,)}):
        assert across(value) == value


def test_a_request_pattern_matches_the_same_on_the_other_node():
    match across(("add", 5)):
        case ("add", int(n)):
            assert n == 5
        case _:
            pytest.fail("a tuple request did not match")


def test_attrs_instances_arrive_unstructured():
    @attrs.frozen
    class Move:
        x: int
        y: tuple[int, int]

    assert across(Move(1, (2, 3))) == {"x": 1, "y": (2, 3)}
    assert sorted(across({3, 1, 2})) == [1, 2, 3]  # a set: as the converter makes it
    assert across(trio_pgs.ServerRef("s", "k", "a")) == {
        "supervisor": "s", "kind": "k", "key": "a"
    }


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (math.nan, "no JSON form"),
        ([1, math.inf], "no JSON form"),
        ({1: "a"}, "not a str"),
        (object(), "no JSON form"),
        (2**64, "beyond 64 bits"),
        ("\ud800", "lone surrogate"),
        ({"\udfff": 1}, "lone surrogate"),
        ([-(2**63) - 1], "beyond 64 bits"),
    ],
)
def test_a_value_with_no_json_form_is_refused_before_sending(value, why):
    with pytest.raises(trio_pgs.MessageEncodingError, match=why):
        wire.pack(value, unstructure)


def test_a_value_nested_too_deeply_is_refused():
    value: list = []
    for _ in range(300):
        value = [value]
    with pytest.raises(trio_pgs.MessageEncodingError, match="too deeply"):
        wire.pack(value, unstructure)


class Insufficient(trio_pgs.RequestError):
    def __init__(self, balance: int, wanted: int) -> None:
        super().__init__(balance, wanted)
        self.balance, self.wanted = balance, wanted


def error_across(exc, ref=None):
    return wire.unpack_error(
        wire.decode(wire.encode(wire.pack_error(exc, unstructure))), ref, "n1:7000"
    )


def test_a_request_error_subclass_is_rebuilt_with_its_arguments():
    again = error_across(Insufficient(3, 10))
    assert type(again) is Insufficient and (again.balance, again.wanted) == (3, 10)


class Formatted(trio_pgs.RequestError):
    """An error whose __init__ formats its message: its args are not its parameters."""

    def __init__(self, code: int, *, detail: str = "none") -> None:
        super().__init__(f"refused with code={code} ({detail})")
        self.code, self.detail = code, detail


def test_a_request_error_with_its_own_init_arrives_with_its_fields():
    again = error_across(Formatted(7, detail="late"))
    assert type(again) is Formatted
    assert (again.code, again.detail) == (7, "late")
    assert str(again) == "refused with code=7 (late)"


def test_an_unknown_request_error_class_arrives_as_a_plain_request_error():
    data = wire.pack_error(Insufficient(3, 10), unstructure)
    data["class"] = "elsewhere:Missing"
    again = wire.unpack_error(data, None, "n1:7000")
    assert type(again) is trio_pgs.RequestError and "3" in str(again)


def test_the_library_errors_arrive_as_themselves():
    ref = trio_pgs.ServerRef("s", "k", "a")
    assert type(error_across(trio_pgs.ServerNotFound("gone"))) is trio_pgs.ServerNotFound
    assert type(error_across(trio_pgs.OutcomeUnknown("?"))) is trio_pgs.OutcomeUnknown
    started = error_across(trio_pgs.AlreadyStarted("there", ref), ref)
    assert type(started) is trio_pgs.AlreadyStarted and started.ref == ref
    lost = error_across(trio_pgs.NodeUnavailable("lost", sent=False))
    assert type(lost) is trio_pgs.NodeUnavailable and lost.sent is False
    crashed = error_across(KeyError("boom"))
    assert type(crashed) is trio_pgs.ServerCrashed and "boom" in str(crashed)
    # misuse on the owner's side (release of an active server) is misuse here too
    assert type(error_across(ValueError("active"))) is ValueError


def test_garbage_for_an_error_is_node_unavailable():
    assert type(wire.unpack_error(["no"], None, "n1:7000")) is trio_pgs.NodeUnavailable


# -- placement -------------------------------------------------------------------------


def test_every_node_finds_the_same_owner_whatever_the_order():
    nodes = ["n1", "n2", "n3"]
    for key in map(str, range(200)):
        assert owner(nodes, "k", key) == owner(list(reversed(nodes)), "k", key)


def test_servers_spread_over_the_nodes_and_a_join_moves_only_its_share():
    keys = [str(i) for i in range(3000)]
    before = {key: owner(["n1", "n2", "n3"], "k", key) for key in keys}
    spread = Counter(before.values())
    assert all(800 < spread[node] < 1200 for node in ("n1", "n2", "n3"))
    after = {key: owner(["n1", "n2", "n3", "n4"], "k", key) for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert all(after[key] == "n4" for key in moved)  # only to the new node
    assert 600 < len(moved) < 900  # about a quarter


class _Local:
    name = "sup"

    def _active_count(self) -> int:
        return 0


def test_a_message_over_the_size_limit_is_refused_before_sending():
    from trio_pgs._cluster import LARGEST, ClusterNode

    node = ClusterNode(trio_pgs.Cluster(secret=b"s" * 16), None, _Local(), unstructure)
    ref = trio_pgs.ServerRef("sup", "k", "a")
    assert node.encode("call", ref, "x" * 1000, ())
    with pytest.raises(trio_pgs.MessageEncodingError, match="bytes a message between"):
        node.encode("call", ref, "x" * LARGEST, ())
