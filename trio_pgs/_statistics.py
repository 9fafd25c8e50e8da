"""`SupervisorStatistics`: a snapshot of a supervisor's counters, plain data."""

from __future__ import annotations

import attrs


@attrs.frozen
class SupervisorStatistics:
    """A snapshot of a supervisor's counters (see `PersistentSupervisor.statistics`).

    Attributes:
        name: The supervisor's name.
        active: Servers active or in transition now (dormant ones cost nothing).
        activations: Activations since the supervisor opened (first ones included).
        hibernations: Activations that ended because the server was idle.
        crashes: Handler, init and activation failures.
        stops: Servers that stopped (any reason).
        messages: Messages handled successfully.
        commits: Store transactions the writer committed.
        records_written: Records written (or wiped) in those transactions.
        failed_commits: Operations the store refused or failed.
        quarantined: Servers put in quarantine since the supervisor opened.
        migrations: Records migrated to the class's state_version (and committed).
        refusals: Requests refused by a handler raising a `RequestError` (not crashes).
        unflushed: Servers whose last change was not committed at shutdown: a handler
            cut off at ``shutdown_timeout``, or a deferred (``WRITE_BEHIND``,
            ``ON_STOP``) state the store refused; empty until shutdown.
        fenced_writes: Writes the store refused for their epoch: a later activation
            (another process, another node) had claimed the server.
        nodes: The live nodes of the cluster (1 outside a cluster).
        forwarded: Messages sent to the node that owns their server.
        served_for_others: Messages other nodes sent here.
        handoffs: Servers asked to hibernate here because another node owns them now.
        lost_leases: Times this node's lease ran out before it was renewed.
        reminders: Reminders delivered to ``handle_info`` (a redelivery after a crash
            counts again).
        woken_by_reminders: Dormant servers activated because a reminder was due.
        queued: Messages waiting in the mailboxes of the active servers now.
    """

    name: str
    active: int
    activations: int
    hibernations: int
    crashes: int
    stops: int
    messages: int
    commits: int
    records_written: int
    failed_commits: int
    quarantined: int
    migrations: int = 0
    refusals: int = 0
    unflushed: tuple[str, ...] = ()
    fenced_writes: int = 0
    nodes: int = 1
    forwarded: int = 0
    served_for_others: int = 0
    handoffs: int = 0
    lost_leases: int = 0
    reminders: int = 0
    woken_by_reminders: int = 0
    queued: int = 0

    @property
    def mean_batch_size(self) -> float:
        """The mean number of records per store transaction (``records_written /
        commits``, 0.0 before the first commit), which shows how well group commit
        batches."""
        return self.records_written / self.commits if self.commits else 0.0
