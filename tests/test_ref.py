"""ServerRef: plain, serialisable data."""

from __future__ import annotations

import json

import attrs
import pytest
from cattrs.preconf.json import make_converter

from trio_pgs import PersistentServer, PersistentSupervisor, Reply, ServerRef

from .servers import TallyServer


def test_ref_is_frozen_and_hashable():
    ref = ServerRef("default", "tally", "k")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ref.key = "other"  # type: ignore[misc]
    assert {ref: 1}[ServerRef("default", "tally", "k")] == 1
    assert str(ref) == "tally/k"


def test_ref_round_trips_through_cattrs_and_json():
    converter = make_converter()
    ref = ServerRef("default", "tally", "k")
    text = converter.dumps(ref)
    assert json.loads(text) == {"supervisor": "default", "kind": "tally", "key": "k"}
    assert converter.loads(text, ServerRef) == ref


@attrs.define
class Friends:
    best: ServerRef | None = None


class FriendServer(PersistentServer[Friends]):
    async def handle_call(self, request, state):
        if request == "best":
            return Reply(state.best, state)
        return Reply(None, Friends(request))


async def test_a_ref_in_a_state_is_usable_after_a_restart(store):
    async with PersistentSupervisor(store=store) as sup:
        alice = await sup.start(TallyServer, "alice's", key="alice")
        bob = await sup.start(FriendServer, Friends(), key="bob")
        await bob.call(alice)
    async with PersistentSupervisor(store=store, servers=[TallyServer, FriendServer]) as sup:
        best = await sup.ref(FriendServer, "bob").call("best")
        assert best == alice
        assert await best.call("get") == ["alice's"]
