"""The SQL of `PostgresStore`'s membership (docs/cluster.md): joining a supervisor
name, renewing a lease, leaving. Everything here runs on a worker thread, on one
connection.

Leases are timed by the database's clock alone (``now()``): a lease runs out when
``expires_at <= now()`` on the server, whatever the nodes' clocks say. Joins of one
name take turns on the name's row in ``supervisors`` (``SELECT ... FOR UPDATE``), so
two processes opening one name at once cannot both be its only member. Membership
transactions wait for the WAL flush even on connections that do not
(``synchronous_commit``): a lease that a crash of the database could take back would
be no lease.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._errors import PersistenceError
from ._store import Member

if TYPE_CHECKING:
    import psycopg

_MEMBER = (
    "supervisor, node, incarnation, address, clustered, host, pid,"
    " extract(epoch FROM started_at), extract(epoch FROM expires_at - now()), leaving, active,"
    " proof"
)
_DURABLE = "SET LOCAL synchronous_commit = on"


def join(
    connection: psycopg.Connection[Any], schema: str, supervisor: str, node: str, *,
    address: str, clustered: bool, lease: float, host: str, pid: int, proof: str = "",
) -> int:
    """Add *node* to *supervisor*'s members; return its incarnation, or raise
    `PersistenceError` naming the member that holds the name."""
    s = schema
    with connection.transaction():
        connection.execute(_DURABLE)
        connection.execute(
            f"INSERT INTO {s}.supervisors (supervisor) VALUES (%s) ON CONFLICT DO NOTHING",
            (supervisor,),
        )
        connection.execute(
            f"SELECT joins FROM {s}.supervisors WHERE supervisor = %s FOR UPDATE", (supervisor,)
        )
        # Members whose lease ran out are gone: their servers are anyone's now. So is
        # an earlier incarnation of this node (it joins again after losing its lease).
        connection.execute(
            f"DELETE FROM {s}.nodes WHERE supervisor = %s AND (expires_at <= now()"
            " OR node = %s)", (supervisor, node),
        )
        live = [_member(row) for row in connection.execute(
            f"SELECT {_MEMBER} FROM {s}.nodes WHERE supervisor = %s", (supervisor,)
        )]
        for holder in live:
            if not holder.clustered or not clustered:
                if _left_behind(holder, host):
                    connection.execute(
                        f"DELETE FROM {s}.nodes WHERE supervisor = %s AND node = %s",
                        (supervisor, holder.node),
                    )
                    continue
                raise PersistenceError(_taken(holder, clustered))
        row = connection.execute(
            f"UPDATE {s}.supervisors SET joins = joins + 1 WHERE supervisor = %s"
            " RETURNING joins", (supervisor,),
        ).fetchone()
        assert row is not None
        incarnation = int(row[0])
        connection.execute(
            f"INSERT INTO {s}.nodes (supervisor, node, incarnation, address, clustered,"
            " host, pid, proof, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
            " now() + %s * interval '1 second')",
            (supervisor, node, incarnation, address, clustered, host, pid, proof, lease),
        )
    return incarnation


def renew(
    connection: psycopg.Connection[Any], schema: str, supervisor: str, node: str,
    incarnation: int, *, lease: float, active: int, leaving: bool,
) -> tuple[Member, ...] | None:
    """Renew *node*'s lease; return the live members, or None if it is no member."""
    s = schema
    with connection.transaction():
        connection.execute(_DURABLE)
        renewed = connection.execute(
            f"UPDATE {s}.nodes SET expires_at = now() + %s * interval '1 second',"
            " active = %s, leaving = %s"
            " WHERE supervisor = %s AND node = %s AND incarnation = %s AND expires_at > now()"
            " RETURNING 1",
            (lease, active, leaving, supervisor, node, incarnation),
        ).fetchone()
        if renewed is None:
            return None
        rows = connection.execute(
            f"SELECT {_MEMBER} FROM {s}.nodes WHERE supervisor = %s AND expires_at > now()"
            " ORDER BY node", (supervisor,),
        ).fetchall()
    return tuple(_member(row) for row in rows)


def leave(
    connection: psycopg.Connection[Any], schema: str, supervisor: str, node: str,
    incarnation: int,
) -> None:
    with connection.transaction():
        connection.execute(_DURABLE)
        connection.execute(
            f"DELETE FROM {schema}.nodes WHERE supervisor = %s AND node = %s"
            " AND incarnation = %s", (supervisor, node, incarnation),
        )


def members(
    connection: psycopg.Connection[Any], schema: str, supervisor: str | None
) -> tuple[Member, ...]:
    rows = connection.execute(
        f"SELECT {_MEMBER} FROM {schema}.nodes WHERE %s::text IS NULL OR supervisor = %s"
        " ORDER BY supervisor, node", (supervisor, supervisor),
    ).fetchall()
    return tuple(_member(row) for row in rows)


def _member(row: Any) -> Member:
    return Member(
        supervisor=row[0], node=row[1], incarnation=int(row[2]), address=row[3],
        clustered=bool(row[4]), host=row[5], pid=int(row[6]), started_at=float(row[7]),
        expires_in=float(row[8]), leaving=bool(row[9]), active=int(row[10]),
        proof=row[11],
    )


def _left_behind(holder: Member, host: str) -> bool:
    """A member of this host whose process is gone (killed before it could leave):
    its lease need not run out before the name is taken again."""
    if holder.host != host or holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, but belongs to someone else
        return False
    return False


def _taken(holder: Member, clustered: bool) -> str:
    where = f"{holder.host} (pid {holder.pid})"
    if holder.address:
        where += f", listening on {holder.address}"
    if holder.clustered:
        what, hint = "a node of a cluster", (
            "open this one with cluster=trio_pgs.Cluster(...) to join that cluster, or "
            "give it another name="
        )
    else:
        what, hint = "its only supervisor", (
            "to serve one name from several processes, open every one of them with "
            "cluster=trio_pgs.Cluster(...); otherwise give this one another name=, or "
            "wait for that lease to run out if that process is gone"
        )
    return (
        f"supervisor {holder.supervisor!r} is already open on this database, as {what}: "
        f"node {holder.node} on {where}, lease running {max(holder.expires_in, 0):.1f} s "
        f"more; {hint}"
    )
