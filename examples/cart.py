"""Shopping carts on trio-pgs, written behind: many edits, few writes.

Every cart is a persistent server in ``Persistence.WRITE_BEHIND`` mode. An add or a
remove is answered at once, and the cart's newest state is written at most
``max_lag`` seconds after it changed: a burst of edits costs one write, and the
writes of all carts share transactions. The price is that a process killed with
changes pending loses up to ``max_lag`` seconds of them: acceptable for a cart, not for
an order. So checkout places the order with the order book, a server in the default
``EACH_MESSAGE`` mode (the order is committed before checkout returns), and then ends
the cart with ``Stop(reason="normal")``, which wipes its record.

Customers who do not check out leave their carts behind; the next run finds them,
unless they expired first. Each cart keeps a durable reminder, ``expire``, moved
forward by every edit: when it comes due, the cart is activated if it is dormant (or
its process was down at the time: then at the next start), tells the order book, and
stops, which wipes it. No timer task waits in memory for the carts nobody touches.

    python examples/cart.py                 # 200 customers, 100 edits each
    python examples/cart.py --quick         # a short run: 30 customers, 40 edits
    python examples/cart.py --help          # customers, edits, abandon, expire, lag, store
"""

from __future__ import annotations

import argparse
import functools
import random
import uuid
from collections.abc import Mapping
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
    Reminder,
    Reply,
    ServerRef,
    Stop,
)

#: What the shop sells, with prices in cents.
CATALOG = {"apple": 40, "bread": 250, "milk": 120, "tea": 450, "coffee": 899,
           "socks": 700, "book": 1_500}
#: Orders the order book keeps in full; older ones only count in the totals.
RECENT_ORDERS = 1_000
#: Seconds an untouched cart lives (a day; --expire changes it).
EXPIRE_AFTER = 86_400.0


@attrs.frozen
class Cart:
    """The state of one cart: what the store keeps (as JSON)."""

    customer: str
    cart_id: str  # unique per cart: the order book recognises a checkout retried with it
    orders: ServerRef  # where this cart checks out: a ref is plain data in a state
    items: dict[str, int] = attrs.field(factory=dict)  # product -> quantity
    expire_after: float = EXPIRE_AFTER  # seconds untouched before the cart expires


@attrs.frozen
class Order:
    number: int
    cart_id: str
    customer: str
    items: dict[str, int]
    total: int  # cents


@attrs.frozen
class OrderBook:
    placed: int = 0
    revenue: int = 0  # cents
    recent: tuple[Order, ...] = ()  # the last RECENT_ORDERS orders
    expired: int = 0  # carts that expired before checkout


class OrderBookServer(PersistentServer[OrderBook]):
    kind = "shop.orders"
    # The default persistence, EACH_MESSAGE: an order is committed before the cart that
    # placed it hears of it.

    async def handle_call(self, request: Any, book: OrderBook) -> CallResult[OrderBook]:
        match request:
            case ("place", Cart() as cart):
                for order in book.recent:
                    if order.cart_id == cart.cart_id:
                        # The cart placed it, then died before it could stop: the same
                        # order again, not a second one.
                        return Reply(order, book)
                total = sum(CATALOG[product] * count for product, count in cart.items.items())
                order = Order(book.placed + 1, cart.cart_id, cart.customer, cart.items, total)
                book = OrderBook(
                    placed=order.number,
                    revenue=book.revenue + total,
                    recent=(*book.recent, order)[-RECENT_ORDERS:],
                )
                return Reply(order, book)
            case "show":
                return Reply(book, book)
        return await super().handle_call(request, book)

    async def handle_cast(self, message: Any, book: OrderBook) -> CastResult[OrderBook]:
        match message:
            case ("expired", str()):
                return NoReply(attrs.evolve(book, expired=book.expired + 1))
        return await super().handle_cast(message, book)


class CartServer(PersistentServer[Cart]):
    kind = "shop.cart"
    persistence = trio_pgs.Persistence.WRITE_BEHIND
    max_lag = 0.5  # seconds a change may wait before it is written
    idle_timeout = 2.0  # an abandoned cart hibernates (and is written) after this

    async def init(self, customer: str, orders: ServerRef, expire_after: float) -> Cart:
        # Durable: created with the cart, in the same commit.
        self.remind("expire", after=expire_after)
        return Cart(customer, uuid.uuid4().hex, orders, expire_after=expire_after)

    async def handle_call(self, request: Any, cart: Cart) -> CallResult[Cart]:
        if request != "show" and request != "checkout":
            # Setting it again replaces it: every edit gives the cart its full time
            # again (committed with the edit; written behind, like the edit).
            self.remind("expire", after=cart.expire_after)
        match request:
            case ("add", str(product), int(count)) if product in CATALOG and count > 0:
                cart = with_count(cart, product, cart.items.get(product, 0) + count)
                return Reply(cart.items[product], cart)  # answered now, written later
            case ("remove", str(product), int(count)) if count > 0:
                cart = with_count(cart, product, cart.items.get(product, 0) - count)
                return Reply(cart.items.get(product, 0), cart)
            case "show":
                return Reply(cart.items, cart)
            case "checkout":
                if not cart.items:
                    return Reply(None, cart)
                order = await cart.orders.call(("place", cart))  # committed when it returns
                # The cart's job is done: a normal stop wipes its record. Nothing of it
                # needs writing first, hence persist=False.
                return Stop(cart, reason="normal", reply=order, persist=False)
        return await super().handle_call(request, cart)

    async def handle_info(self, message: Any, cart: Cart) -> CastResult[Cart]:
        match message:
            case Reminder(name="expire"):
                # At least once: if this crashed before the stop's commit, it would come
                # again; the order book's count is an estimate for the report.
                await cart.orders.cast(("expired", cart.cart_id))
                return Stop(cart, reason="normal")  # wipes the record, reminders too
        return await super().handle_info(message, cart)


def with_count(cart: Cart, product: str, count: int) -> Cart:
    items = {name: n for name, n in cart.items.items() if name != product}
    if count > 0:
        items[product] = count
    return attrs.evolve(cart, items=items)


@attrs.define
class Tally:
    edits: int = 0
    orders: int = 0
    abandoned: int = 0
    continued: int = 0  # carts left by an earlier run
    gone: int = 0  # carts that expired while their customer was still shopping


async def shop(sup: PersistentSupervisor, customer: str, orders: ServerRef, edits: int,
               abandon: float, expire: float, tally: Tally) -> None:
    """One customer: fill a cart (or continue an old one), then check out or walk away."""
    try:
        cart = await sup.start(CartServer, customer, orders, expire, key=f"cart-{customer}")
    except trio_pgs.AlreadyStarted as exc:
        cart = exc.ref  # left by an earlier run, with its items: continue it
        tally.continued += 1
    try:
        for _ in range(edits):
            product = random.choice(list(CATALOG))
            if random.random() < 0.7:
                await cart.call(("add", product, random.randint(1, 3)))
            else:
                await cart.call(("remove", product, 1))
            tally.edits += 1
            await trio.sleep(random.uniform(0, 0.02))  # browsing
        if random.random() < abandon:
            tally.abandoned += 1  # the cart stays: written within max_lag, or at shutdown
            return
        if await cart.call("checkout") is not None:
            tally.orders += 1
    except trio_pgs.ServerNotFound:
        tally.gone += 1  # it expired (its reminder came due) while the customer browsed


def describe_progress(sup: PersistentSupervisor, tally: Tally, elapsed: float) -> str:
    stats = sup.statistics()
    return (f"  {elapsed:4.1f}s  {tally.edits:6,} edits  {tally.orders:4,} orders"
            f"  so far: {stats.messages:6,} messages handled, "
            f"{stats.records_written:5,} records written in {stats.commits:4,} commits")


def print_book(when: str, book: OrderBook) -> None:
    print(f"Order book {when}: {book.placed:,} orders, revenue {book.revenue / 100:,.2f}")


def print_orders(orders: tuple[Order, ...]) -> None:
    for order in orders:
        print(f"    #{order.number} {order.customer}: {format_items(order.items)}, "
              f"{order.total / 100:,.2f}")


def format_items(items: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {product}" for product, count in sorted(items.items()))


def print_statistics(stats: trio_pgs.SupervisorStatistics) -> None:
    print(
        "Supervisor statistics:\n"
        f"  active now: {stats.active:,} servers\n"
        f"  so far: {stats.activations:,} activations, {stats.hibernations:,} "
        f"hibernations, {stats.stops:,} stops, {stats.messages:,} messages handled\n"
        f"  written so far: {stats.records_written:,} records in {stats.commits:,} "
        f"commits (mean batch size {stats.mean_batch_size:.1f})"
    )


async def main(
    customers: int, edits: int, abandon: float, expire: float, lag: float, store: str
) -> None:
    print(f"{customers:,} customers making {edits} edits each in {store!r}; "
          f"carts written at most {lag} s after a change, expiring {expire:g} s after "
          "the last one")
    async with PersistentSupervisor(
        store=trio_pgs.DiskCacheStore(store),
        servers=[CartServer, OrderBookServer],
        max_lag=lag,  # overrides the class's; only write-behind servers use it
    ) as sup:
        try:
            orders = await sup.start(OrderBookServer, OrderBook(), key="orders")
        except trio_pgs.AlreadyStarted as exc:
            orders = exc.ref
        print_book("before", await orders.call("show"))

        tally = Tally()
        describe = functools.partial(describe_progress, sup, tally)
        async with progress(describe, every=1.0), trio.open_nursery() as customers_nursery:
            for number in range(customers):
                customers_nursery.start_soon(shop, sup, f"c{number:04d}", orders, edits,
                                             abandon, expire, tally)

        print(f"Edits: {tally.edits:,}; orders placed: {tally.orders:,}; carts continued "
              f"from the last run: {tally.continued:,}; carts abandoned: {tally.abandoned:,}")
        book = await orders.call("show")
        print_book("after", book)
        print(f"Carts expired so far (all runs): {book.expired:,}; expired while their "
              f"customer shopped in this run: {tally.gone:,}; reminders delivered in "
              f"this run: {sup.statistics().reminders:,}")
        print_orders(book.recent[-3:])
    stats = sup.statistics()
    print_statistics(stats)
    # Records written: the new carts, their coalesced changes, the orders, and the
    # carts wiped at checkout.
    print(f"Write-behind: {stats.messages:,} messages, {stats.records_written:,} records "
          f"written in {stats.commits:,} commits")
    print(
        "What this run showed:\n"
        f"  - Write-behind: {stats.messages:,} messages answered at once cost only "
        f"{stats.records_written:,} record writes,\n"
        f"    shared among {stats.commits:,} commits: a burst of edits to a cart is "
        f"written once.\n"
        f"  - Each checkout placed its order in an order book committed before checkout "
        f"returned, then\n"
        f"    stopped its cart, which wiped the cart's record ({tally.orders:,} orders).\n"
        f"  - The {tally.abandoned:,} abandoned carts are in the store (written within "
        f"max_lag, or at shutdown):\n"
        f"    the next run finds them, unless their expiry reminder is due by then:\n"
        f"    a reminder that came due while nothing ran fires as soon as the store opens."
    )
    print("Run it again: the abandoned carts are waiting, and the order book goes on.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Run it twice: the abandoned carts are waiting, and the order book goes on.",
    )
    parser.add_argument("--customers", type=int, default=200,
                        help="Customers, each with a cart (default: %(default)s).")
    parser.add_argument("--edits", type=int, default=100,
                        help="Adds and removes each customer makes (default: %(default)s).")
    parser.add_argument("--abandon", type=float, default=0.2,
                        help="Share of the customers who leave without checking out, "
                             "from 0 to 1 (default: %(default)s).")
    parser.add_argument("--expire", type=float, default=EXPIRE_AFTER,
                        help="Seconds an untouched cart lives before its reminder expires "
                             "it (default: %(default)s, a day).")
    parser.add_argument("--lag", type=float, default=CartServer.max_lag,
                        help="The carts' max_lag: seconds a change may wait before it is "
                             "written (default: %(default)s).")
    parser.add_argument("--store", default="cart-state",
                        help="The store's directory (default: %(default)s).")
    parser.add_argument("--quick", action="store_true",
                        help="A short run: 30 customers, 40 edits each.")
    args = parser.parse_args()
    if args.quick:
        args.customers, args.edits = 30, 40
    return args


if __name__ == "__main__":
    options = parse_args()
    trio.run(main, options.customers, options.edits, options.abandon, options.expire,
             options.lag, options.store)
