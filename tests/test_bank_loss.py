"""The bank example's conservation check must not report money as lost when a transfer
completes while it reads the accounts.

`settle` reads every account concurrently, one "show" each, and each account answers
at its own moment. A transfer whose deposit (payee) and outbox removal (payer) both
happen between the payee's read and the payer's read is in neither: the read shows no
money in outboxes and a total short by its amount, although every account holds what
it should. This is how "Total balance before: 19,826 ... NOT CONSERVED" was reported
after a killed run: the next run's settle reads while the outboxes the kill left are
being sent. Here the two reads are put in that order on purpose.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

from trio_pgs import MemoryStore, PersistentSupervisor, Put, Record

EXAMPLES = Path(__file__).parent.parent / "examples"
KIND = "bank.account"


def load_bank() -> ModuleType:
    """examples/bank.py as a module (it imports progress_line from its directory)."""
    name = "bank_example_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "bank.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # attrs and cattrs resolve the annotations through it
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def account(key: str, owner: str, balance: int, **fields: Any) -> Record:
    state = {
        "owner": owner, "balance": balance, "outbox": [], "next_number": 1,
        "deposited": {}, "repeats": 0, "ledger": [], **fields,
    }
    return Record(kind=KIND, key=key, data=json.dumps(state).encode())


async def test_settle_does_not_lose_a_transfer_completed_between_its_reads():
    bank = load_bank()
    store = MemoryStore()
    # What a killed run leaves: a00000 debited 174 for a00001 and had not sent it yet.
    payee_ref = {"supervisor": "default", "kind": KIND, "key": "a00001"}
    await store.open()
    await store.commit([
        Put(account("a00000", "owner 0", 826, next_number=2,
                    outbox=[{"number": 1, "to": payee_ref, "amount": 174}],
                    ledger=["-174 to a00001 (#1)"]), 0),
        Put(account("a00001", "owner 1", 1000), 0),
    ])
    await store.close()

    async with PersistentSupervisor(store=store, servers=[bank.AccountServer]) as sup:
        payer = sup.ref(bank.AccountServer, "a00000")
        payee = sup.ref(bank.AccountServer, "a00001")
        payee_read = trio.Event()

        class PayeeReadFirst:
            async def call(self, request: Any) -> Any:
                state = await payee.call(request)
                payee_read.set()
                return state

        class PayerReadAfterItsTransfer:
            sent = False

            async def call(self, request: Any) -> Any:
                await payee_read.wait()
                if not self.sent:
                    self.sent = True
                    # What the payer's own timer sends (on_activate arms it for a
                    # non-empty outbox): deposit the oldest transfer, then remove it.
                    await payer.send("send-outbox")
                return await payer.call(request)  # handled after that

        with trio.fail_after(20):
            settled = await bank.settle([PayerReadAfterItsTransfer(), PayeeReadFirst()])
            quiet = await bank.read_all([payer, payee])

    # Nothing was lost: both accounts, read once nothing moves, hold the 2,000.
    assert [state.balance for state in quiet] == [826, 1174]
    assert bank.in_flight(settled) == 0
    # What settle returned must say so too (before the fix: [826, 1000], 174 "lost").
    assert [state.balance for state in settled] == [826, 1174]
