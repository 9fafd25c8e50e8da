"""The bank of bank.py on a cluster of three nodes, one of them killed with SIGKILL while
transfers run: no money is lost, and every transfer a client was told is done is done.

This program starts three node processes (itself, with ``--node``) that open the same
supervisor name on one PostgreSQL database, each with ``cluster=trio_pgs.Cluster(...)``.
The accounts are spread over the nodes (rendezvous hashing), and every node runs
clients that transfer money between random accounts: most calls go to an account on
another node, and most deposits too. Midway, one node is killed with SIGKILL: no
shutdown, no last commit. Its accounts are served by the two others once its lease
runs out (3 seconds here; 10 by default). Deposits to its accounts wait in their
payers' outboxes meanwhile (see `ClusterAccount.send_outbox`).

A client learns one of three things about its transfer:

- done (the payer answered True): the debit and the deposit are committed;
- refused (``InsufficientFunds``, or ``NodeUnavailable`` with ``sent=False``: the
  message never left): nothing happened;
- unknown: ``NodeUnavailable`` with ``sent=True`` (the payer's node died with the
  call in flight), or no answer at all (the client died with its node).

At the end this program reads every account and checks that the total is what the bank
issued, and that each account's balance and count of debits are exactly what the
transfers that were done make of them, plus some of the unknown ones (it finds which):
so no done transfer is missing, none applied twice.

    python examples/cluster.py                   # a throwaway PostgreSQL (pgserver)
    python examples/cluster.py --store postgresql://user@host/db?schema=bank_demo

Every node listens on 127.0.0.1 only; the nodes' logs are kept (and named) only when
a run fails. Without ``?schema=``, each run uses a fresh schema (named on the first
lines), which it leaves behind on a server of yours.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from bank import OPENING_BALANCE, Account, AccountServer, InsufficientFunds, account_key
from progress_line import on_terminal, progress

import trio_pgs
from trio_pgs import CallResult, NoReply, PersistentSupervisor, Reply, ServerRef

NAME = "bank"
#: The cluster's shared secret. A real deployment reads it from a secret store; every
#: node gets the same one (here: from the environment this program gives them).
SECRET_VARIABLE = "BANK_CLUSTER_SECRET"
#: A short lease, so that the demo's failover takes seconds (the default is 10 s).
LEASE = 3.0
NODES = 3
#: How long a deposit may take before it is sent again (see `ClusterAccount`).
DEPOSIT_PATIENCE = 0.3


# -- a node ---------------------------------------------------------------------------


class ClusterAccount(AccountServer):
    """bank.py's account, with its requests in plain data.

    A message that crosses to another node arrives as the JSON of its unstructured
    form: a `ServerRef` inside a request would arrive as a dict, and bank.py's
    ``("transfer", ServerRef, amount)`` would not match. So clients send the payee's
    key, and the account makes the ref itself.
    """

    async def handle_call(self, request: Any, state: Account) -> CallResult[Account]:
        match request:
            case ("send", str(payee), int(amount)):
                to = attrs.evolve(self.ref, key=payee)
                return await super().handle_call(("transfer", to, amount), state)
            case "balance":  # balance, debits ever made, money still in the outbox
                in_flight = sum(transfer.amount for transfer in state.outbox)
                answer = (state.balance, state.next_number - 1, in_flight)
                return Reply(answer, state, persist=False)
        return await super().handle_call(request, state)

    async def send_outbox(self, state: Account) -> NoReply[Account]:
        """bank.py's, for a cluster: a deposit that fails or takes too long leaves the
        transfer in the outbox, to be sent again in a moment (the payee ignores a
        deposit it has already).

        Two things only a cluster does make this necessary. The payee's node may be
        dead (`NodeUnavailable`) until its lease runs out. And two accounts on two
        nodes that deposit to each other at once may both get `CallCycleError` (one
        process refuses only the second call), and a ring of deposits through three nodes
        may get it too (docs/cluster.md). Giving up after `DEPOSIT_PATIENCE`, or on a
        cycle, lets each one handle the other's deposit first.
        """
        if not state.outbox:
            return NoReply(state)
        transfer = state.outbox[0]
        try:
            with trio.fail_after(DEPOSIT_PATIENCE):
                await transfer.to.call(
                    ("deposit", self.ref.key, transfer.number, transfer.amount)
                )
        except trio_pgs.ServerNotFound:
            return await super().send_outbox(state)  # bank.py gives the money back
        except (trio.TooSlowError, trio_pgs.NodeUnavailable, trio_pgs.CallCycleError,
                trio_pgs.ServerCrashed, trio_pgs.ServerQuarantined,
                trio_pgs.SupervisorNotRunning):
            self.send_after(random.uniform(0.01, 0.1), "send-outbox")
            return NoReply(state)
        return await self.transfer_done(transfer, attrs.evolve(state, outbox=state.outbox[1:]))


def emit(event: str, **fields: Any) -> None:
    """One line for the coordinator on stdout."""
    print(json.dumps({"event": event, **fields}), flush=True)


async def node_main(name: str, dsn: str, schema: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(message)s")
    store = trio_pgs.PostgresStore(dsn, schema=schema)
    cluster = trio_pgs.Cluster(
        secret=os.environ[SECRET_VARIABLE], listen="127.0.0.1:0", lease=LEASE
    )
    async with PersistentSupervisor(
        store=store, name=NAME, servers=[ClusterAccount], cluster=cluster,
        max_crashes=1_000_000,  # as bank.py: no quarantine for crashes it causes itself
    ) as sup:
        me = next(m for m in await store.members(NAME) if m.pid == os.getpid())
        while sup.statistics().nodes < NODES:  # the others are starting too
            await trio.sleep(0.05)
        emit("up", node=me.node, address=me.address)
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            match json.loads(line):
                case ["open", int(accounts)]:
                    await open_accounts(sup, accounts)
                    emit("opened")
                case ["balances", int(accounts)]:
                    refs = [sup.ref(ClusterAccount, account_key(n)) for n in range(accounts)]
                    emit("balances", balances=await settled_balances(refs))
                case ["transfer", int(accounts), float(seconds), int(clients)]:
                    refs = [sup.ref(ClusterAccount, account_key(n)) for n in range(accounts)]
                    await run_clients(name, refs, seconds, clients)
                    emit("transferred")
                case ["stop"]:
                    break
                case other:
                    raise ValueError(f"unknown command {other!r}")
    stats = sup.statistics()
    emit("stopped", activations=stats.activations, forwarded=stats.forwarded,
         served_for_others=stats.served_for_others, handoffs=stats.handoffs,
         crashes=stats.crashes, fenced_writes=stats.fenced_writes)


async def open_accounts(sup: PersistentSupervisor, accounts: int) -> None:
    async def open_account(number: int) -> None:
        try:
            await sup.start(ClusterAccount, f"owner {number}", OPENING_BALANCE,
                            key=account_key(number))
        except trio_pgs.AlreadyStarted:
            pass  # from an earlier run on this schema: it continues from the store

    async with trio.open_nursery() as nursery:
        for number in range(accounts):
            nursery.start_soon(open_account, number)


async def settled_balances(refs: Sequence[ServerRef]) -> dict[str, list[int]]:
    """Every account's balance and debits, once no money is in flight. Reading an
    account wakes it, and a woken account sends its outbox: the transfers a crash or
    the dead node interrupted are completed this way.

    One read is not a snapshot (each account answers at its own moment: a transfer
    that completes between its payee's answer and its payer's is in neither), so a
    read with nothing in flight counts only when the next read is the same."""
    previous: dict[str, list[int]] | None = None
    while True:
        found: dict[str, list[int]] = {}

        async def read(ref: ServerRef, found: dict[str, list[int]]) -> None:
            for attempt in itertools.count():
                try:
                    found[ref.key] = list(await ref.call("balance"))
                    return
                except (trio_pgs.NodeUnavailable, trio_pgs.ServerCrashed):
                    await trio.sleep(0.1 * min(attempt + 1, 5))  # moving: ask again

        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(read, ref, found)
        if not any(in_flight for _, _, in_flight in found.values()):
            if found == previous:
                return found
            previous = found
            continue
        previous = None
        await trio.sleep(0.1)


async def run_clients(name: str, refs: Sequence[ServerRef], seconds: float,
                      clients: int) -> None:
    deadline = trio.current_time() + seconds
    numbers = itertools.count()

    async def client() -> None:
        while trio.current_time() < deadline:
            payer, payee = random.sample(refs, 2)
            amount = random.randint(1, 200)
            number = f"{name}-{next(numbers)}"
            # Said before the call: if this node dies now, the coordinator knows what
            # was in flight.
            emit("t", id=number, payer=payer.key, payee=payee.key, amount=amount)
            outcome = await transfer(payer, payee, amount)
            emit("r", id=number, outcome=outcome)
            if outcome != "done":
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)


async def transfer(payer: ServerRef, payee: ServerRef, amount: int) -> str:
    try:
        done = await payer.call(("send", payee.key, amount))
    except InsufficientFunds:  # rebuilt on this node from the owner's exception
        return "refused"
    except trio_pgs.NodeUnavailable as exc:
        return "unknown: NodeUnavailable(sent=True)" if exc.sent else "not sent"
    except trio_pgs.TrioPGSError as exc:  # ServerCrashed, most likely
        return f"unknown: {type(exc).__name__}"
    return "done" if done else "refused"


# -- the coordinator --------------------------------------------------------------------


@attrs.define
class Ledger:
    """What the clients of every node said about their transfers."""

    begun: dict[str, tuple[str, str, int]] = attrs.field(factory=dict)
    outcomes: dict[str, str] = attrs.field(factory=dict)

    def count(self, prefix: str) -> int:
        return sum(outcome.startswith(prefix) for outcome in self.outcomes.values())

    def with_outcome(self, prefix: str) -> list[tuple[str, str, int]]:
        return [self.begun[i] for i, outcome in self.outcomes.items()
                if outcome.startswith(prefix)]

    def unknown(self) -> list[tuple[str, str, int]]:
        """The transfers whose outcome no client knows: said so, or never answered
        (their client died with its node)."""
        return [transfer for i, transfer in self.begun.items()
                if self.outcomes.get(i, "unknown").startswith("unknown")]


class Node:
    """A node process, and the events it prints."""

    def __init__(self, number: int, process: trio.Process, ledger: Ledger) -> None:
        self.number, self.process, self.ledger = number, process, ledger
        self.events_in, self.events = trio.open_memory_channel[dict[str, Any]](100)
        self.done = 0

    @property
    def name(self) -> str:
        return f"node {self.number}"

    async def read(self) -> None:
        """Take the node's lines until it exits."""
        assert self.process.stdout is not None
        buffer = b""
        async with self.events_in:
            async for chunk in self.process.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    await self._take(json.loads(line))

    async def _take(self, event: dict[str, Any]) -> None:
        if event["event"] == "t":
            self.ledger.begun[event["id"]] = (event["payer"], event["payee"], event["amount"])
        elif event["event"] == "r":
            self.ledger.outcomes[event["id"]] = event["outcome"]
            self.done += event["outcome"] == "done"
        else:
            await self.events_in.send(event)

    async def send(self, *command: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def expect(self, name: str) -> dict[str, Any]:
        try:
            event = await self.events.receive()
        except trio.EndOfChannel:
            raise SystemExit(f"{self.name} exited with status {await self.process.wait()} "
                             f"instead of saying {name!r}: see its log") from None
        if event["event"] != name:
            raise RuntimeError(f"{self.name}: expected {name}, got {event}")
        return event


def without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def split_schema(url: str) -> tuple[str, str | None]:
    """*url* without its ``schema`` parameter (libpq knows none), and that schema."""
    base, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith("schema=")]
    schemas = [urllib.parse.unquote(p[7:]) for p in query.split("&") if p.startswith("schema=")]
    return base + ("?" + "&".join(kept) if kept else ""), (schemas[-1] if schemas else None)


@attrs.define
class PostgreSQL:
    dsn: str
    cleanup: Callable[[], None] | None = None  # stops a throwaway server


def start_postgresql(directory: str) -> PostgreSQL:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
        try:
            # From its module: pgserver's package does not re-export it for type checkers.
            from pgserver.postgres_server import get_server
        except ImportError:
            raise SystemExit("no pgserver: pip install pgserver, or give --store "
                             "postgresql://...") from None
        server = get_server(directory, cleanup_mode="delete")
    return PostgreSQL(str(server.get_uri()), server.cleanup)


async def coordinate(args: argparse.Namespace) -> None:
    started = trio.current_time()

    def at() -> str:
        return f"{trio.current_time() - started:5.1f}s"

    logs = Path(tempfile.mkdtemp(prefix="trio-pgs-cluster-"))
    if args.store is None:
        database = start_postgresql(str(logs / "postgres"))
        print(f"{at()}  PostgreSQL: a throwaway server (pgserver) in {logs / 'postgres'}")
    else:
        database = PostgreSQL(args.store)
        print(f"{at()}  PostgreSQL: {without_password(args.store)}")
    dsn, schema = split_schema(database.dsn)
    schema = schema or f"bank_cluster_{uuid.uuid4().hex[:8]}"
    url = f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
    environment = {**os.environ, SECRET_VARIABLE: uuid.uuid4().hex + uuid.uuid4().hex}
    ledger = Ledger()
    nodes: list[Node] = []
    try:
        async with trio.open_nursery() as nursery:
            for number in range(1, NODES + 1):
                with (logs / f"node{number}.log").open("wb") as log:
                    process = await trio.lowlevel.open_process(
                        [sys.executable, __file__, "--node", str(number), "--dsn", dsn,
                         "--schema", schema],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                        env=environment,
                    )
                node = Node(number, process, ledger)
                nodes.append(node)
                nursery.start_soon(node.read)
            print(f"{at()}  Started {NODES} nodes of supervisor {NAME!r} in schema "
                  f"{schema!r}")
            ups = await wait_until_up(nodes, at)
            for node, up in zip(nodes, ups, strict=True):
                print(f"{at()}    {node.name}: pid {node.process.pid}, listening on "
                      f"{up['address']}, id {up['node']}")
            await run(args, nodes, ledger, url, at)
            nursery.cancel_scope.cancel()
    except BaseException:
        print(f"The nodes' logs are in {logs}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(logs, ignore_errors=True)
    finally:
        for node in nodes:
            if node.process.returncode is None:
                node.process.kill()
        if database.cleanup is not None:
            database.cleanup()


async def wait_until_up(nodes: Sequence[Node], at: Callable[[], str]) -> list[dict[str, Any]]:
    """Each node's "up" event: it says so once it sees all the nodes as members."""
    ups: list[dict[str, Any]] = []

    def describe(elapsed: float) -> str:
        return (f"{at()}    waiting for the nodes to join the cluster: {len(ups)} of "
                f"{len(nodes)} up")

    async with progress(describe):
        with trio.fail_after(30):
            for node in nodes:
                ups.append(await node.expect("up"))
    return ups


def say(line: str) -> None:
    """Print *line* while a progress line may be showing (on a terminal: over it)."""
    print(f"\r\033[K{line}" if on_terminal() else line, flush=True)


@attrs.define
class Failover:
    """When the victim was killed, and what the other nodes' clients had done by then."""

    killed_after: float = 0.0  # seconds into the transfers
    done_before: int = 0  # transfers done by the survivors' clients before the kill


async def run(args: argparse.Namespace, nodes: list[Node], ledger: Ledger, url: str,
              at: Callable[[], str]) -> None:
    first, victim = nodes[0], nodes[-1]
    survivors = nodes[:-1]
    await first.send("open", args.accounts)
    await first.expect("opened")
    await first.send("balances", args.accounts)
    before: dict[str, list[int]] = (await first.expect("balances"))["balances"]
    total = sum(balance for balance, _, _ in before.values())
    print(f"{at()}  {args.accounts} accounts, spread over the nodes; total balance "
          f"{total:,}")

    failover = await transfer_and_kill(args, nodes, at)
    await show_nodes(url, at)

    def describe(elapsed: float) -> str:
        return (f"{at()}    reading every account, until no money is left in an outbox "
                f"({elapsed:.0f} s)")

    await first.send("balances", args.accounts)
    async with progress(describe):
        after: dict[str, list[int]] = (await first.expect("balances"))["balances"]
    forwarded = 0
    for node in survivors:
        await node.send("stop")
        stats = await node.expect("stopped")
        forwarded += stats["forwarded"]
        print(f"{at()}  {node.name} stopped. So far: {stats['forwarded']:,} messages "
              f"forwarded to other nodes, {stats['served_for_others']:,} handled for them;\n"
              f"          {stats['activations']:,} activations, {stats['handoffs']:,} "
              f"accounts handed to a new owner, {stats['crashes']:,} crashes, "
              f"{stats['fenced_writes']:,} stale writes refused")
    applied = print_verdict(ledger, before, after, victim)
    print_what_it_showed(args, ledger, victim, failover, forwarded, total, applied)


async def transfer_and_kill(args: argparse.Namespace, nodes: list[Node],
                            at: Callable[[], str]) -> Failover:
    """Every node's clients transfer for ``args.seconds``; the last node is killed with
    SIGKILL a third of the way through."""
    victim, survivors = nodes[-1], nodes[:-1]
    failover = Failover()
    print(f"{at()}  Transfers for {args.seconds:g} s by {args.clients} clients on every "
          f"node, between random accounts:")
    started = trio.current_time()
    for node in nodes:
        await node.send("transfer", args.accounts, args.seconds, args.clients)

    async def kill_the_victim() -> None:
        await trio.sleep(args.seconds / 3)
        victim.process.send_signal(signal.SIGKILL)  # no shutdown, no last commit
        await victim.process.wait()
        failover.killed_after = trio.current_time() - started
        failover.done_before = sum(node.done for node in survivors)
        say(f"{at()}  SIGKILL to {victim.name} (pid {victim.process.pid}): its accounts "
            f"wait for its lease ({LEASE:g} s) to run out")

    def describe(elapsed: float) -> str:
        return f"{at()}    transfers done: " + ", ".join(
            f"{node.name} {node.done:,}"
            + (" (killed)" if node is victim and victim.process.returncode is not None
               else "")
            for node in nodes)

    async with progress(describe, every=1.0), trio.open_nursery() as nursery:
        nursery.start_soon(kill_the_victim)
        for node in survivors:
            await node.expect("transferred")
        nursery.cancel_scope.cancel()
    return failover


async def show_nodes(url: str, at: Callable[[], str]) -> None:
    print(f"{at()}  Nodes as `trio-pgs nodes` shows them:")
    shown = await trio.run_process([sys.executable, "-m", "trio_pgs", "nodes", url],
                                   capture_stdout=True)
    table = [line.split("\t") for line in shown.stdout.decode().splitlines()]
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(("      " + "  ".join(cells)).rstrip())


def print_verdict(ledger: Ledger, before: dict[str, list[int]],
                  after: dict[str, list[int]], victim: Node) -> list[tuple[str, str, int]]:
    """Print what the clients were told and what the balances say; exit with status 1
    if money was lost or created, or a done transfer is missing or applied twice.
    Return the unknown transfers that were applied."""
    done = ledger.with_outcome("done")
    unknown = ledger.unknown()
    why = {f"in flight in {victim.name}'s clients when it died":
           sum(1 for i in ledger.begun if i not in ledger.outcomes)}
    for outcome in sorted(set(ledger.outcomes.values())):
        if outcome.startswith("unknown: "):
            why[outcome.removeprefix("unknown: ")] = ledger.count(outcome)
    reasons = ", ".join(f"{count:,} {reason}" for reason, count in why.items() if count)
    print(f"Transfers: {len(done):,} done, {ledger.count('refused'):,} refused "
          f"(insufficient funds), {ledger.count('not sent'):,} not sent "
          f"(NodeUnavailable, sent=False)")
    print(f"Of unknown outcome: {len(unknown):,}" + (f" ({reasons})" if reasons else ""))
    issued, total = (sum(balance for balance, _, _ in state.values())
                     for state in (before, after))
    verdict = "conserved" if total == issued else "NOT CONSERVED"
    print(f"Total balance: {total:,} in {len(after)} accounts (before: {issued:,}): "
          f"{verdict}")
    applied = explain(before, after, done, unknown)
    if applied is None:
        print("Balances NOT explained by the transfers done: a transfer was lost or "
              "applied twice")
    else:
        print(f"Every account's balance and debits are exactly the {len(done):,} "
              f"transfers done plus {len(applied)} of\nthe {len(unknown)} unknown ones: "
              f"no done transfer lost, none applied twice")
    if total != issued or applied is None:
        raise SystemExit(1)
    return applied


def print_what_it_showed(args: argparse.Namespace, ledger: Ledger, victim: Node,
                         failover: Failover, forwarded: int, issued: int,
                         applied: Sequence[tuple[str, str, int]]) -> None:
    done = ledger.count("done")
    done_after_kill = done - victim.done - failover.done_before
    unknown = len(ledger.unknown())
    print(
        "What this run showed:\n"
        f"  - {NODES} node processes served {args.accounts} accounts from one PostgreSQL "
        f"database; the {NODES - 1} that ran\n"
        f"    to the end forwarded {forwarded:,} messages to the nodes that owned their "
        f"accounts.\n"
        f"  - {victim.name.capitalize()} was killed with SIGKILL "
        f"{failover.killed_after:.1f} s into the transfers. Once its lease ran out,\n"
        f"    its accounts moved to the other nodes, whose clients then got "
        f"{done_after_kill:,} more transfers done.\n"
        f"  - The balances add up to the {issued:,} the bank issued: no money was created "
        f"or lost.\n"
        f"  - Each of the {done:,} transfers a client was told were done is in the "
        f"balances, once.\n"
        f"    Of the {unknown:,} whose outcome no client knew, the balances show that "
        f"{len(applied):,} happened."
    )


def explain(
    before: dict[str, list[int]], after: dict[str, list[int]],
    done: Sequence[tuple[str, str, int]], unknown: Sequence[tuple[str, str, int]],
) -> list[tuple[str, str, int]] | None:
    """Which of the *unknown* transfers, applied with all the *done* ones, make
    *before* into *after* exactly (balances and debit counts); None if none do."""
    balance = {key: after[key][0] - before[key][0] for key in after}
    debits = {key: after[key][1] - before[key][1] for key in after}
    for payer, payee, amount in done:
        balance[payer] += amount
        balance[payee] -= amount
        debits[payer] -= 1
    # Each payer made `debits[payer]` of its unknown transfers: try those subsets.
    by_payer: dict[str, list[tuple[str, str, int]]] = {}
    for transfer in unknown:
        by_payer.setdefault(transfer[0], []).append(transfer)
    if any(count < 0 or count > len(by_payer.get(key, [])) for key, count in debits.items()):
        return None
    choices = [itertools.combinations(by_payer.get(key, []), count)
               for key, count in debits.items()]
    for picked in itertools.islice(itertools.product(*choices), 1_000_000):
        applied = [transfer for group in picked for transfer in group]
        left = dict(balance)
        for payer, payee, amount in applied:
            left[payer] += amount
            left[payee] -= amount
        if not any(left.values()):
            return applied
    return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Without ?schema=NAME, each run uses a fresh schema, which it leaves behind "
               "on a server of yours. The nodes' logs are kept, and named, only when a run "
               "fails.",
    )
    parser.add_argument("--store", metavar="URL",
                        help="The PostgreSQL database, as postgresql://...[?schema=NAME] "
                             "(default: a throwaway server in a temporary directory, "
                             "started with pgserver).")
    parser.add_argument("--accounts", type=int, default=30,
                        help="Accounts in the bank, each opened with "
                             f"{OPENING_BALANCE:,} (default: %(default)s).")
    parser.add_argument("--clients", type=int, default=8,
                        help="Concurrent clients on each node, each making one transfer "
                             "at a time (default: %(default)s).")
    parser.add_argument("--seconds", type=float, default=9.0,
                        help="How long the clients transfer, in seconds; one node is "
                             "killed a third of the way through; at least 3 "
                             "(default: %(default)s).")
    parser.add_argument("--node", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accounts < 2:
        parser.error("--accounts: a transfer needs two accounts")
    if args.seconds < 3:
        parser.error("--seconds: at least 3, to see the failover")
    return args


if __name__ == "__main__":
    options = parse_args()
    if options.node is not None:
        trio.run(node_main, f"n{options.node}", options.dsn, options.schema)
    else:
        trio.run(coordinate, options)
