"""A bank on trio-pgs: concurrent transfers that never create or lose money, even when
accounts crash half-way through.

Every account is a persistent server. A transfer from A to B takes three steps, and
each one is committed before the next starts:

1. A debits itself and puts the transfer in its outbox, with a number from A's own
   sequence (1, 2, 3, ...). The client's call returns only after step 3.
2. A calls B's ``deposit``. B credits the amount unless it already has it: B keeps, for
   each account that pays it, the highest transfer number it deposited. A sends its
   outbox in order, oldest first, so any number not above that mark is a repeat.
3. A removes the transfer from its outbox and answers the client.

A crash between two steps leaves the transfer in A's outbox, because step 1 was
committed. Every activation of A sends its outbox again, and B ignores the deposits it
already has. So at every moment: balances + money in outboxes == money the bank issued.
``--chaos`` crashes accounts at random between the steps to show it.

A transfer larger than the balance is refused, not crashed: the account raises
``InsufficientFunds``, a ``trio_pgs.RequestError``. The client gets that exception
itself, the account is untouched (nothing is written, no crash is counted), and the
account goes on serving.

Run it twice: the second run continues every balance from ``bank-state/``, and
finishes any transfer that a killed first run left in flight.

    python examples/bank.py                 # 200 accounts, 100 clients, 10 seconds
    python examples/bank.py --quick         # a short run: 30 accounts, 2 seconds
    python examples/bank.py --help          # accounts, clients, seconds, chaos, store
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Sequence
from typing import Any

import attrs
import trio
from progress_line import progress

import trio_pgs
from trio_pgs import (
    CallResult,
    CastResult,
    NoReply,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    ServerRef,
)

#: What every new account starts with: all the money in the bank comes from here.
OPENING_BALANCE = 1_000
#: Operations kept in an account's ledger, for people to read (newest last).
LEDGER_SIZE = 5
#: Probability that an account crashes at one of the injected points (set by --chaos).
CHAOS = 0.0
#: The delay of the timer that sends the outbox. It only has to be positive: a timer
#: is handled as a message, so after the commit of the message that armed it.
SOON = 0.001


class ChaosCrash(Exception):
    """A crash injected by --chaos."""


class InsufficientFunds(trio_pgs.RequestError):
    """A transfer larger than the payer's balance.

    A `trio_pgs.RequestError` refuses the request: the caller gets this exception, the
    account's state is unchanged, nothing is committed, and it is not a crash (a client
    asking for too much must not get an account quarantined).
    """


def maybe_crash(where: str) -> None:
    if random.random() < CHAOS:
        raise ChaosCrash(where)


@attrs.frozen
class Transfer:
    """Money that left this account and that the payee has not confirmed yet."""

    number: int  # from the payer's own sequence: deposits arrive in this order
    to: ServerRef  # a ref is plain data: states can hold one
    amount: int


@attrs.frozen
class Account:
    """The state of one account: what the store keeps (as JSON)."""

    owner: str
    balance: int
    outbox: tuple[Transfer, ...] = ()  # debited here, not yet deposited there
    next_number: int = 1
    #: For each account that paid us: the highest transfer number deposited here.
    deposited: dict[str, int] = attrs.field(factory=dict)
    repeats: int = 0  # deposits received again after a crash, and ignored
    ledger: tuple[str, ...] = ()  # the last LEDGER_SIZE operations

    def logged(self, line: str) -> tuple[str, ...]:
        return (*self.ledger, line)[-LEDGER_SIZE:]


class AccountServer(PersistentServer[Account]):
    kind = "bank.account"
    idle_timeout = 5.0

    def __init__(self) -> None:
        # The clients waiting for their transfers, by number. Like every instance
        # attribute this lives as long as one activation: if it crashes, they get
        # ServerCrashed, and the next activation still completes their transfers.
        self.waiting: dict[int, trio_pgs.Caller] = {}

    async def init(self, owner: str, balance: int) -> Account:
        return Account(owner, balance)

    async def on_activate(self, state: Account) -> Account:
        if state.outbox:
            # A crash, a kill or a shutdown stopped transfers half-way: finish them.
            self.send_after(SOON, "send-outbox")
        return state

    async def handle_call(self, request: Any, state: Account) -> CallResult[Account]:
        match request:
            case ("transfer", ServerRef() as to, int(amount)) if amount > 0:
                if to == self.ref:
                    raise trio_pgs.RequestError(f"{self.ref}: cannot transfer to itself")
                if amount > state.balance:
                    # A refusal: checked before anything changes, and raised rather than
                    # returned, so the client cannot mistake it for a transfer.
                    raise InsufficientFunds(
                        f"{self.ref}: balance {state.balance:,}, cannot pay {amount:,}"
                    )
                transfer = Transfer(state.next_number, to, amount)
                state = attrs.evolve(
                    state,
                    balance=state.balance - amount,
                    outbox=(*state.outbox, transfer),
                    next_number=transfer.number + 1,
                    ledger=state.logged(f"-{amount} to {to.key} (#{transfer.number})"),
                )
                # Step 1. The deposit must not start before the debit is committed, and
                # this handler's state is committed when it returns: so the outbox is
                # sent by a timer, and the client is answered later.
                self.waiting[transfer.number] = trio_pgs.current_caller()
                if len(state.outbox) == 1:  # otherwise the outbox is being sent already
                    self.send_after(SOON, "send-outbox")
                return NoReply(state)
            case ("deposit", str(payer), int(number), int(amount)):
                if number <= state.deposited.get(payer, 0):
                    # The payer crashed after we took it and sends it again: say yes,
                    # credit nothing.
                    return Reply(True, attrs.evolve(state, repeats=state.repeats + 1))
                state = attrs.evolve(
                    state,
                    balance=state.balance + amount,
                    deposited={**state.deposited, payer: number},
                    ledger=state.logged(f"+{amount} from {payer} (#{number})"),
                )
                maybe_crash("during a deposit, before its commit")
                return Reply(True, state)  # step 2, committed before the payer hears yes
            case "show":
                return Reply(state, state)
        return await super().handle_call(request, state)

    async def handle_info(self, message: Any, state: Account) -> CastResult[Account]:
        match message:
            case "send-outbox":
                return await self.send_outbox(state)
        return await super().handle_info(message, state)

    async def send_outbox(self, state: Account) -> NoReply[Account]:
        """Deposit the oldest transfer of the outbox, then arm the timer for the next."""
        if not state.outbox:
            return NoReply(state)  # a timer armed twice (after a crash): nothing left
        transfer = state.outbox[0]
        try:
            await transfer.to.call(("deposit", self.ref.key, transfer.number, transfer.amount))
        except trio_pgs.ServerNotFound:
            # No such account (never opened, or closed): the money comes back.
            state = attrs.evolve(
                state,
                balance=state.balance + transfer.amount,
                outbox=state.outbox[1:],
                ledger=state.logged(f"+{transfer.amount} returned (#{transfer.number})"),
            )
            return await self.transfer_done(transfer, state, ok=False)
        except (
            trio_pgs.CallCycleError,  # the payee is paying us now: waiting would deadlock
            trio_pgs.ServerCrashed,  # it crashed before committing the deposit
            trio_pgs.ServerQuarantined,
            trio_pgs.SupervisorNotRunning,  # shutting down: the next run sends it
        ):
            # The transfer stays in the outbox; try again in a moment.
            self.send_after(random.uniform(0.005, 0.05), "send-outbox")
            return NoReply(state)
        maybe_crash("after a deposit, before the outbox is updated")
        return await self.transfer_done(transfer, attrs.evolve(state, outbox=state.outbox[1:]))

    async def transfer_done(
        self, transfer: Transfer, state: Account, ok: bool = True
    ) -> NoReply[Account]:
        """Step 3: the transfer leaves the outbox; its client hears of it after the commit."""
        if state.outbox:
            self.send_after(SOON, "send-outbox")
        caller = self.waiting.pop(transfer.number, None)
        if caller is not None:  # None: the client asked an activation that crashed
            await caller.reply(ok)  # released only once this state is committed
        return NoReply(state)


class HideChaosCrashes(logging.Filter):
    """The crashes --chaos injects are expected: count them, do not print them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ChaosCrash))


@attrs.define
class Tally:
    """What the clients saw, for the progress lines."""

    transfers: int = 0
    refused: int = 0  # not enough money (InsufficientFunds), or no such payee
    interrupted: int = 0  # the payer crashed; the transfer completes anyway
    moved: int = 0


def account_key(number: int) -> str:
    return f"a{number:05d}"


async def open_accounts(sup: PersistentSupervisor, accounts: int) -> tuple[list[ServerRef], int]:
    """Open the accounts the store does not have yet; return every account and how many
    the store already had."""
    existing = 0

    async def open_account(number: int) -> None:
        nonlocal existing
        try:
            await sup.start(
                AccountServer, f"owner {number}", OPENING_BALANCE, key=account_key(number)
            )
        except trio_pgs.AlreadyStarted:
            existing += 1  # opened by an earlier run: it continues from the store

    async with trio.open_nursery() as nursery:
        for number in range(accounts):
            nursery.start_soon(open_account, number)
    # An earlier run with a larger --accounts opened more: count them, or the money
    # they hold would look lost.
    while True:
        try:
            await sup.ref(AccountServer, account_key(accounts)).call("show")
        except trio_pgs.ServerNotFound:
            break
        accounts += 1
        existing += 1
    return [sup.ref(AccountServer, account_key(n)) for n in range(accounts)], existing


async def read_all(refs: Sequence[ServerRef]) -> list[Account]:
    """Every account's state (dormant accounts wake from the store to answer)."""
    states: dict[ServerRef, Account] = {}

    async def read(ref: ServerRef) -> None:
        states[ref] = await ref.call("show")

    async with trio.open_nursery() as nursery:
        for ref in refs:
            nursery.start_soon(read, ref)
    return [states[ref] for ref in refs]


def in_flight(states: Sequence[Account]) -> int:
    """The money in the accounts' outboxes: debited, not yet deposited."""
    return sum(transfer.amount for state in states for transfer in state.outbox)


def transfers_in_flight(states: Sequence[Account]) -> int:
    return sum(len(state.outbox) for state in states)


async def settle(refs: Sequence[ServerRef]) -> list[Account]:
    """Wait until no money is in flight, and return every account's state.

    Reading an account wakes it, and a woken account sends its outbox: this is how the
    transfers that a crash (or a killed process) interrupted are completed.

    One read is not a snapshot: each account answers at its own moment. A transfer
    whose deposit and outbox removal both come between the payee's answer and the
    payer's is in neither, and that read shows empty outboxes and money missing. So a
    read with nothing in flight counts only once a second read finds every account
    unchanged: such a transfer would have changed its payee in between.
    """
    states = await read_all(refs)
    while True:
        if not in_flight(states):
            again = await read_all(refs)
            if again == states:
                return states
            states = again
            continue
        await trio.sleep(0.05)
        states = await read_all(refs)


def print_first_account(states: Sequence[Account]) -> None:
    first = states[0]
    print(f"First account: {first.owner}, balance {first.balance:,}, "
          f"{first.next_number - 1:,} transfers sent")


def check_total(when: str, states: Sequence[Account]) -> None:
    total = sum(state.balance for state in states)
    issued = len(states) * OPENING_BALANCE
    verdict = "conserved" if total == issued else "NOT CONSERVED"
    print(f"Total balance {when}: {total:,} in {len(states):,} accounts "
          f"(issued {issued:,}): {verdict}")
    if total != issued:
        raise SystemExit(f"money was created or lost: {total - issued:+,}")


async def show_a_refusal(payer: ServerRef, payee: ServerRef) -> None:
    """Ask an account for more than it holds: it refuses, and nothing changes."""
    before: Account = await payer.call("show")
    amount = before.balance + 1
    try:
        await payer.call(("transfer", payee, amount))
    except InsufficientFunds as exc:  # the exception the handler raised, not ServerCrashed
        after: Account = await payer.call("show")
        untouched = after == before
        print(f"A transfer of {amount:,} from {before.owner}: refused with "
              f"{type(exc).__name__} ({exc}); the account is "
              f"{'untouched' if untouched else 'CHANGED'}")
        if not untouched:
            raise SystemExit("a refused transfer changed the account") from None
    else:
        raise SystemExit(f"a transfer of {amount:,} from a balance of "
                         f"{before.balance:,} was accepted")


async def client(refs: Sequence[ServerRef], deadline: float, tally: Tally) -> None:
    """Transfer random amounts between random accounts until the deadline."""
    while trio.current_time() < deadline:
        payer, payee = random.sample(refs, 2)
        amount = random.randint(1, 200)
        try:
            done = await payer.call(("transfer", payee, amount))
        except InsufficientFunds:
            tally.refused += 1  # a refusal: the payer's account is as it was
            continue
        except trio_pgs.ServerCrashed:
            tally.interrupted += 1  # the money is in the payer's outbox: it will arrive
            continue
        if done:
            tally.transfers += 1
            tally.moved += amount
        else:
            tally.refused += 1  # no such payee: the money came back


async def run_clients(refs: Sequence[ServerRef], clients: int, seconds: float,
                      sup: PersistentSupervisor) -> Tally:
    """Run *clients* concurrent clients for *seconds*, showing their progress."""
    tally = Tally()
    deadline = trio.current_time() + seconds

    def describe(elapsed: float) -> str:
        stats = sup.statistics()
        return (
            f"  {elapsed:4.1f}s  {tally.transfers:7,} transfers"
            f"  {tally.refused:6,} refused  {tally.interrupted:5,} interrupted"
            f"  so far: {stats.crashes:5,} crashes, {stats.commits:6,} commits"
            f" of {stats.mean_batch_size:4.1f} records"
        )

    async with progress(describe, every=1.0), trio.open_nursery() as clients_nursery:
        for _ in range(clients):
            clients_nursery.start_soon(client, refs, deadline, tally)
    print(f"Transfers: {tally.transfers:,} done ({tally.moved:,} moved), "
          f"{tally.refused:,} refused, {tally.interrupted:,} interrupted by a crash")
    return tally


def print_statistics(stats: trio_pgs.SupervisorStatistics) -> None:
    print(
        "Supervisor statistics:\n"
        f"  active now: {stats.active:,} servers\n"
        f"  so far: {stats.activations:,} activations, {stats.hibernations:,} "
        f"hibernations, {stats.crashes:,} crashes, {stats.messages:,} messages handled\n"
        f"  written so far: {stats.records_written:,} records in {stats.commits:,} "
        f"commits (mean batch size {stats.mean_batch_size:.1f})"
    )


def print_what_it_showed(tally: Tally, issued: int, repeats: int,
                         stats: trio_pgs.SupervisorStatistics) -> None:
    print(
        "What this run showed:\n"
        f"  - {tally.transfers:,} transfers moved {tally.moved:,} between accounts, with "
        f"{stats.crashes:,} crashes injected\n"
        f"    between their steps; the {tally.interrupted:,} clients that heard of a crash "
        f"had their transfers completed.\n"
        f"  - The balances add up to the {issued:,} the bank issued, before and after: "
        f"no money was created\n"
        f"    or lost.\n"
        f"  - Deposits sent again after a crash were recognised and ignored "
        f"({repeats:,} in all runs).\n"
        f"  - A transfer above the balance was refused with the handler's own exception "
        f"and changed nothing."
    )


async def main(accounts: int, clients: int, seconds: float, chaos: float, store: str) -> None:
    global CHAOS
    CHAOS = chaos
    # An application configures logging: crashes are then logged with their traceback
    # (without it, trio-pgs prints one line per crash), and filters see the exception.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trio_pgs").addFilter(HideChaosCrashes())
    print(f"A bank of {accounts:,} accounts in {store!r}, {clients} clients, "
          f"crash probability {chaos:.1%}")
    async with PersistentSupervisor(
        store=trio_pgs.DiskCacheStore(store),
        servers=[AccountServer],
        # --chaos crashes the same accounts again and again, on purpose. Quarantine
        # protects against a message that crashes a server every time; not needed here.
        max_crashes=1_000_000,
    ) as sup:
        refs, existing = await open_accounts(sup, accounts)
        if existing:
            print(f"Continuing {existing:,} accounts from {store!r}")
        if existing < len(refs):
            print(f"Opened {len(refs) - existing:,} new accounts")
        states = await read_all(refs)
        if in_flight(states):
            print(f"Finishing the transfers a killed run left half-way: "
                  f"{transfers_in_flight(states):,} transfers, {in_flight(states):,} "
                  f"money in outboxes")
        states = await settle(refs)
        print_first_account(states)
        check_total("before", states)
        await show_a_refusal(refs[0], refs[1])

        tally = await run_clients(refs, clients, seconds, sup)

        states = await settle(refs)
        print_first_account(states)
        check_total("after", states)
        repeats = sum(state.repeats for state in states)
        print(f"Deposits repeated after a crash and ignored, all runs: {repeats:,}")
        richest = max(states, key=lambda state: state.balance)
        print(f"Richest: {richest.owner} with {richest.balance:,}; last operations:")
        for line in richest.ledger:
            print(f"    {line}")
    stats = sup.statistics()
    print_statistics(stats)
    print_what_it_showed(tally, len(states) * OPENING_BALANCE, repeats, stats)
    print("Run it again: every balance continues from the store.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Run it twice: the second run continues every balance from the store and "
               "finishes the transfers a killed run left in flight.",
    )
    parser.add_argument("--accounts", type=int, default=200,
                        help="Accounts in the bank, each opened with "
                             f"{OPENING_BALANCE:,} (default: %(default)s).")
    parser.add_argument("--clients", type=int, default=100,
                        help="Concurrent clients, each making one transfer at a time "
                             "(default: %(default)s).")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="How long the clients transfer, in seconds "
                             "(default: %(default)s).")
    parser.add_argument("--chaos", type=float, default=0.01,
                        help="Probability that an account crashes at each of the injected "
                             "points of a transfer; 0 for none (default: %(default)s).")
    parser.add_argument("--store", default="bank-state",
                        help="The store's directory (default: %(default)s).")
    parser.add_argument("--quick", action="store_true",
                        help="A short run: 30 accounts, 20 clients, 2 seconds.")
    args = parser.parse_args()
    if args.quick:
        args.accounts, args.clients, args.seconds = 30, 20, 2.0
    if args.accounts < 2:
        parser.error("--accounts: a transfer needs two accounts")
    return args


if __name__ == "__main__":
    options = parse_args()
    trio.run(main, options.accounts, options.clients, options.seconds, options.chaos,
             options.store)
