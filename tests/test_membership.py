"""Membership on PostgreSQL: one supervisor per name without a cluster, leases timed by
the database, and what a node does when its lease is gone. (Several nodes at once
need several processes: tests/test_cluster.py.)"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from typing import Any

import psycopg
import pytest
import trio

import trio_pgs
from trio_pgs import Member, PersistenceError, PersistentSupervisor, PostgresStore

from .postgres import ClockedPostgresStore, Server
from .servers import TallyServer

HOST = socket.gethostname()


def rows(postgres: Server, schema: str) -> list[tuple]:
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        return connection.execute(
            f'SELECT supervisor, clustered, host, pid FROM "{schema}".nodes ORDER BY node'
        ).fetchall()


def execute(postgres: Server, statement: str) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute(statement)


async def test_a_supervisor_is_the_member_of_its_name_while_open(postgres: Server):
    schema = postgres.schema()
    async with PersistentSupervisor(store=PostgresStore(postgres.dsn, schema=schema)) as sup:
        assert rows(postgres, schema) == [("default", False, HOST, os.getpid())]
        await sup.start(TallyServer, key="a")
    assert rows(postgres, schema) == []  # it left


async def test_a_second_supervisor_of_one_name_is_refused_naming_the_holder(postgres: Server):
    schema = postgres.schema()
    first = PostgresStore(postgres.dsn, schema=schema)
    await first.open()
    try:  # another process, on another host, holds the name
        await first.join("default", "n1", address="", clustered=False, lease=600,
                         host="elsewhere", pid=4321)
    finally:
        await first.close()
    second = PostgresStore(postgres.dsn, schema=schema)
    with pytest.raises(PersistenceError) as caught:
        await _open_and_close(second)
    message = str(caught.value)
    assert "'default' is already open on this database, as its only supervisor" in message
    assert "node n1 on elsewhere (pid 4321)" in message
    assert "cluster=trio_pgs.Cluster" in message
    assert second._pool is None  # the refused supervisor closed its store
    with pytest.raises(PersistenceError, match="as its only supervisor"):
        await _open_and_close(PostgresStore(postgres.dsn, schema=schema),
                              cluster=trio_pgs.Cluster(secret=b"s" * 16))


async def _open_and_close(store: PostgresStore, **options) -> None:
    async with PersistentSupervisor(store=store, **options):
        pass


async def test_other_names_share_a_database(postgres: Server):
    schema = postgres.schema()
    async with PersistentSupervisor(store=PostgresStore(postgres.dsn, schema=schema)):
        async with PersistentSupervisor(
            store=PostgresStore(postgres.dsn, schema=schema), name="other"
        ):
            assert sorted(r[0] for r in rows(postgres, schema)) == ["default", "other"]


async def test_the_member_row_of_a_dead_process_of_this_host_is_taken_over(postgres: Server):
    """A process killed with -9 never leaves: its successor need not wait for the lease."""
    schema = postgres.schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    await store.open()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        await store.join("default", "gone", address="", clustered=False, lease=600,
                         host=HOST, pid=dead.pid)
    finally:
        await store.close()
    async with PersistentSupervisor(store=PostgresStore(postgres.dsn, schema=schema)):
        assert rows(postgres, schema) == [("default", False, HOST, os.getpid())]


async def test_a_member_whose_lease_ran_out_is_no_obstacle(postgres: Server):
    schema = postgres.schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    await store.open()
    try:
        await store.join("default", "old", address="", clustered=False, lease=600,
                         host="elsewhere", pid=1)
    finally:
        await store.close()
    execute(postgres, f"UPDATE \"{schema}\".nodes SET expires_at = now() - interval '1 s'")
    async with PersistentSupervisor(store=PostgresStore(postgres.dsn, schema=schema)):
        assert rows(postgres, schema) == [("default", False, HOST, os.getpid())]


async def test_a_cluster_node_and_a_lone_supervisor_exclude_each_other(postgres: Server):
    schema = postgres.schema()
    cluster = trio_pgs.Cluster(secret=b"s" * 16)
    store = PostgresStore(postgres.dsn, schema=schema)
    await store.open()
    try:
        await store.join("default", "n1", address="10.0.0.1:7000", clustered=True,
                         lease=600, host="elsewhere", pid=1)
        with pytest.raises(PersistenceError, match="as a node of a cluster"):
            await store.join("default", "lone", address="", clustered=False, lease=600,
                             host="elsewhere", pid=2)
        # another node of the cluster is welcome
        await store.join("default", "n2", address="10.0.0.2:7000", clustered=True,
                         lease=600, host="elsewhere", pid=3)
        found = await store.members("default")
    finally:
        await store.close()
    assert [(m.node, m.incarnation, m.address) for m in found] == [
        ("n1", 1, "10.0.0.1:7000"), ("n2", 2, "10.0.0.2:7000"),
    ]
    assert all(isinstance(m, Member) and 599 < m.expires_in <= 600 for m in found)
    assert PersistentSupervisor(store=PostgresStore(postgres.dsn, schema=schema),
                                cluster=cluster).cluster is cluster


async def test_renewing_a_lease_that_ran_out_says_so(postgres: Server):
    schema = postgres.schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    await store.open()
    try:
        incarnation = await store.join("default", "n1", address="", clustered=False,
                                       lease=600, host=HOST, pid=os.getpid())
        live = await store.renew("default", "n1", incarnation, lease=600, active=3,
                                 leaving=False)
        assert live is not None and [(m.node, m.active) for m in live] == [("n1", 3)]
        execute(postgres, f"UPDATE \"{schema}\".nodes SET expires_at = now()")
        assert await store.renew("default", "n1", incarnation, lease=600, active=3,
                                 leaving=False) is None
        await store.leave("default", "n1", incarnation)
        assert await store.members() == ()
    finally:
        await store.close()


async def test_a_supervisor_whose_membership_was_removed_joins_again(postgres: Server):
    """The store says this node is no member (its row is gone): it joins again, as a new
    incarnation, and keeps serving."""
    schema = postgres.schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        before = await store.members("default")
        execute(postgres, f'DELETE FROM "{schema}".nodes')
        await sup._node.membership.refresh()  # learns it; the lease task joins again
        with trio.fail_after(10):
            while not (after := await store.members("default")):
                await trio.sleep(0.05)
        assert [m.incarnation for m in after] == [before[0].incarnation + 1]
        assert sup.statistics().lost_leases == 1
        assert await ref.call(("add", 1)) == 1


async def test_the_lease_is_renewed_by_the_database_clock(postgres: Server, autojump_clock):
    """Hours of (virtual) time: the membership is renewed all along."""
    schema = postgres.schema()
    async with PersistentSupervisor(store=postgres.store(schema=schema)) as sup:
        await trio.sleep(3_600)
        assert sup.statistics().lost_leases == 0
        assert len(rows(postgres, schema)) == 1


def test_a_cluster_needs_a_store_that_keeps_members(tmp_path):
    with pytest.raises(TypeError, match="PostgresStore"):
        PersistentSupervisor(store=trio_pgs.MemoryStore(),
                             cluster=trio_pgs.Cluster(secret=b"s" * 16))
    with pytest.raises(TypeError, match=r"trio_pgs\.Cluster"):
        PersistentSupervisor(store=trio_pgs.MemoryStore(), cluster={"secret": "x"})


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"secret": b"short"}, "at least 16 bytes"),
        ({"secret": 12345}, "at least 16 bytes"),
        ({"secret": b"s" * 16, "listen": "localhost"}, "host:port"),
        ({"secret": b"s" * 16, "listen": "h:99999"}, "host:port"),
        ({"secret": b"s" * 16, "advertise": ":80"}, "host:port"),
        ({"secret": b"s" * 16, "listen": "127.0.0.1:\u00b2"}, "host:port"),
        ({"secret": b"s" * 16, "advertise": "0.0.0.0:7000"}, "connect to"),
        ({"secret": b"s" * 16, "advertise": "[::]:7000"}, "connect to"),
        ({"secret": b"s" * 16, "advertise": "10.0.0.1:0"}, "connect to"),
        ({"secret": b"s" * 16, "advertise": "[::0]:7000"}, "connect to"),
        ({"secret": b"s" * 16, "advertise": "0:7000"}, "connect to"),
        ({"secret": b"s" * 16, "listen": "0.0.0.0:7000"}, "give advertise"),
        ({"secret": b"s" * 16, "lease": 0.5}, "between 1 and 3600"),
        ({"secret": b"s" * 16, "lease": True}, "between 1 and 3600"),
    ],
)
def test_a_cluster_refuses_bad_settings(options, error):
    with pytest.raises((ValueError, TypeError), match=error):
        trio_pgs.Cluster(**options)


def test_a_cluster_keeps_its_secret_out_of_its_repr():
    cluster = trio_pgs.Cluster(secret="a secret of some length")
    assert "secret" not in repr(cluster).lower().replace("cluster(", "")
    assert cluster.secret == b"a secret of some length"


def test_tls_needs_both_contexts():
    import ssl

    with pytest.raises(ValueError, match="both"):
        trio_pgs.Cluster(secret=b"s" * 16, ssl_context=ssl.create_default_context())


async def test_a_node_joining_a_cluster_of_another_secret_is_refused(postgres: Server):
    schema = postgres.schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    await store.open()
    try:  # a node of the cluster, whose proof is not of this secret
        await store.join("default", "n1", address="127.0.0.1:9", clustered=True, lease=600,
                         host="elsewhere", pid=1, proof="0" * 64)
    finally:
        await store.close()
    with pytest.raises(PersistenceError, match="use another secret"):
        await _open_and_close(PostgresStore(postgres.dsn, schema=schema),
                              cluster=trio_pgs.Cluster(secret=b"s" * 16))
    assert [r[2] for r in rows(postgres, schema)] == ["elsewhere"]  # it left again


async def test_a_stranger_that_joined_after_this_node_changes_nothing_here(
    postgres: Server,
):
    """A node of another secret joins after this one (it is refused as it starts, and
    leaves again; or it lingers): this node keeps serving every server it served, and
    the stranger gets none of them and no message."""
    schema = postgres.schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    cluster = trio_pgs.Cluster(secret=b"s" * 16, listen="127.0.0.1:0")
    async with PersistentSupervisor(store=store, cluster=cluster, servers=[TallyServer]) as sup:
        refs = [await sup.start(TallyServer, "a", key=f"k{i}") for i in range(20)]
        await store.join("default", "n1", address="127.0.0.1:9", clustered=True, lease=600,
                         host="elsewhere", pid=1, proof="0" * 64)
        await sup._node.membership.refresh()
        for ref in refs:
            assert await ref.call("get") == ["a"]
        assert sup.statistics().active == 20


async def test_a_stranger_is_reported_once_not_at_every_renewal(
    postgres: Server, caplog: pytest.LogCaptureFixture
):
    """A node of another secret among the members is an error worth one log record
    when it appears, and a note when it is gone, not one at every lease renewal:
    each renewal changes the members' remaining leases, which is a new view."""
    caplog.set_level(logging.INFO, logger="trio_pgs")
    schema = postgres.schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    cluster = trio_pgs.Cluster(secret=b"s" * 16, listen="127.0.0.1:0")

    async def renewals(sup: PersistentSupervisor) -> None:
        for _ in range(3):
            await sup._node.membership.refresh(again=True)
            await trio.sleep(0.01)  # the database's clock moves: another view

    async with PersistentSupervisor(store=store, cluster=cluster, servers=[TallyServer]) as sup:
        joined = {
            node: await store.join("default", node, address="127.0.0.1:9", clustered=True,
                                   lease=600, host="elsewhere", pid=1, proof="0" * 64)
            for node in ("n1", "n2")
        }
        await renewals(sup)
        await store.leave("default", "n2", joined["n2"])
        await renewals(sup)
        await store.leave("default", "n1", joined["n1"])
        await renewals(sup)
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if " n1 " in r.getMessage() or " n2 " in r.getMessage()]
    assert [level for level, _ in said] == ["ERROR", "INFO", "INFO"], said
    assert "n1 at" in said[0][1] and "n2 at" in said[0][1] and "secret" in said[0][1]
    assert "n2 of another secret are gone" in said[1][1]
    assert "n1 of another secret are gone" in said[2][1]


async def test_a_node_joining_again_after_a_stranger_got_in_serves_nothing(
    postgres: Server, caplog: pytest.LogCaptureFixture
):
    """This node's lease ran out (paused, cut off), a node of another secret joined
    meanwhile, with nobody there to refuse it, and may serve every server; this node
    joins again: it serves none (a server active on both would answer from two
    states), and a call through it fails as unavailable, not sent, naming the secret.
    Once the stranger is gone, it serves again, and says so."""
    caplog.set_level(logging.INFO, logger="trio_pgs")
    schema = postgres.schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    cluster = trio_pgs.Cluster(secret=b"s" * 16, listen="127.0.0.1:0")
    async with PersistentSupervisor(store=store, cluster=cluster, servers=[TallyServer]) as sup:
        refs = [await sup.start(TallyServer, "a", key=f"k{i}") for i in range(20)]
        execute(postgres, f'DELETE FROM "{schema}".nodes')  # its lease is gone
        stranger = await store.join("default", "n1", address="127.0.0.1:9", clustered=True,
                                    lease=600, host="elsewhere", pid=1, proof="0" * 64)
        await sup._node.membership.refresh()  # learns it; the lease task joins again
        with trio.fail_after(10):
            while sup.statistics().active:  # every server handed off
                await trio.sleep(0.05)
        for ref in refs:
            with pytest.raises(trio_pgs.NodeUnavailable) as caught:
                await ref.call("get")
            assert not caught.value.sent and "secret" in str(caught.value)
        assert sup.statistics().active == 0
        await store.leave("default", "n1", stranger)
        await sup._node.membership.refresh(again=True)
        assert [await ref.call("get") for ref in refs] == [["a"]] * 20
    said = [r.getMessage() for r in caplog.records]
    assert sum("serves nothing until it leaves" in m for m in said) == 1, said
    assert sum("serves again" in m for m in said) == 1, said


class HangingRenewals(ClockedPostgresStore):
    """A store whose lease renewals never answer once `hang` is set (a database that
    stopped answering)."""

    hang = False

    async def renew(self, *args: Any, **kwargs: Any) -> Any:
        if self.hang:
            await trio.sleep_forever()
        return await super().renew(*args, **kwargs)


async def test_a_cluster_node_exits_within_shutdown_timeout_when_the_database_hangs(
    postgres: Server, autojump_clock
):
    """Leaving tells the others first (a renewal saying "leaving"); with a database that
    does not answer, that wait comes out of ``shutdown_timeout``: the exit still takes
    at most ``shutdown_timeout`` plus a second, as the guide says, not a third of the
    lease more."""
    store = HangingRenewals(postgres.dsn, schema=postgres.schema())
    cluster = trio_pgs.Cluster(secret=b"s" * 16, listen="127.0.0.1:0", lease=60)
    async with PersistentSupervisor(store=store, cluster=cluster, shutdown_timeout=1) as sup:
        await sup.start(TallyServer, key="a")
        store.hang = True
        began = trio.current_time()
    assert trio.current_time() - began <= 1 + 1


class SlowToEnd(TallyServer):
    """A handler that outlasts any shutdown_timeout, and a terminate that outlasts the
    grace it gets once cut off."""

    kind = "slow-to-end"

    async def terminate(self, reason: Any, state: Any) -> None:
        await trio.sleep(60)


async def test_a_shutdown_that_uses_its_whole_grace_still_leaves_the_membership(
    postgres: Server, autojump_clock
):
    """A server cut off at the deadline whose terminate takes all of the grace: the
    supervisor still leaves the membership, so that its name is free at once (a
    membership left behind refuses the name until its lease runs out)."""
    schema = postgres.schema()
    store = postgres.store(schema=schema)
    async with trio.open_nursery() as nursery:
        async with PersistentSupervisor(
            store=store, servers=[SlowToEnd], shutdown_timeout=0.5
        ) as sup:
            ref = await sup.start(SlowToEnd, key="a")
            nursery.start_soon(ref.call, ("sleep", 60))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert rows(postgres, schema) == []
    async with PersistentSupervisor(store=postgres.store(schema=schema)):
        pass  # the name is free


class HeldRenewals(ClockedPostgresStore):
    """A store that records the ``leaving`` of each renewal, and holds them while
    `held` is set (a slow database)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leaving: list[bool] = []
        self.held: trio.Event | None = None

    async def renew(self, *args: Any, **kwargs: Any) -> Any:
        self.leaving.append(kwargs["leaving"])
        if self.held is not None:
            await self.held.wait()
        return await super().renew(*args, **kwargs)


async def test_a_node_leaving_while_a_renewal_is_under_way_still_says_it_leaves(
    postgres: Server, autojump_clock
):
    """The notice that a node leaves is a renewal saying so: one already under way
    when the node begins to leave says it stays, so another goes after it."""
    store = HeldRenewals(postgres.dsn, schema=postgres.schema())
    cluster = trio_pgs.Cluster(secret=b"s" * 16, listen="127.0.0.1:0", lease=60)
    async with PersistentSupervisor(store=store, cluster=cluster) as sup:
        store.held = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup._node.membership.refresh)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(sup._node.announce_leaving)
            await trio.testing.wait_all_tasks_blocked()
            held, store.held = store.held, None
            held.set()
        assert store.leaving[-2:] == [False, True]
