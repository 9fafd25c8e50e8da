"""The examples run, so they never rot."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_pgs

ROOT = Path(__file__).parent.parent


def run_example(name: str, *args: str | Path, timeout: float = 60) -> str:
    """Run ``examples/<name>.py`` with *args* as a user would; return what it printed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stderr}"
    assert result.stderr == ""
    return result.stdout


def number(pattern: str, output: str) -> int:
    """The number matched by the group of *pattern* in *output* (commas allowed)."""
    match = re.search(pattern, output)
    assert match is not None, f"{pattern!r} not in:\n{output}"
    return int(match.group(1).replace(",", ""))


def sent(output: str) -> int:
    """Transfers sent by the bank's first account, in the last line reporting it."""
    return number(r"(?s).*First account: .*?, ([\d,]+) transfers sent", output)


def lines_after(heading: str, output: str, count: int) -> list[str]:
    lines = output.splitlines()
    start = lines.index(heading) + 1
    return lines[start:start + count]


def run_game(store: Path) -> str:
    return run_example("game", "--quick", "--store", store, timeout=300)


def test_game_demo_runs_and_a_second_run_continues_the_scores(tmp_path):
    first = run_game(tmp_path / "game")
    assert "Total score before playing: 0\n" in first
    after_first = first.split("Total score after playing: ")[1].split(" ")[0]
    second = run_game(tmp_path / "game")
    assert "Continuing 500 players" in second
    assert f"Total score before playing: {after_first}\n" in second
    assert "mean batch size" in second

    # The trio-pgs command on the store the demo wrote.
    store = tmp_path / "game"
    stats = trio_pgs_command("stats", store)
    assert re.search(r"^player\s+500\s+0\s+\d+$", stats, re.MULTILINE), stats
    listed = trio_pgs_command("list", store, "--kind", "player").splitlines()
    assert len(listed) == 501 and listed[0].split()[:3] == ["KIND", "KEY", "STATUS"]
    key = listed[1].split()[1]
    shown = json.loads(trio_pgs_command("show", store, "player", key))
    assert set(shown) == {"name", "score", "games"}
    backup = tmp_path / "backup.jsonl"
    trio_pgs_command("export", store, "-o", backup)
    trio_pgs_command("import", tmp_path / "copy", backup)
    assert trio_pgs_command("stats", tmp_path / "copy") == stats


def trio_pgs_command(*args: str | Path) -> str:
    """``python -m trio_pgs ARGS`` (the ``trio-pgs`` console script), piped."""
    result = subprocess.run(
        [sys.executable, "-m", "trio_pgs", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return result.stdout


BANK_SIZES = ("--accounts", "20", "--clients", "20", "--chaos", "0.02")
PROGRESS_LINE = re.compile(r"\s+[\d.]+s\s+[\d,]+ transfers ")


def test_bank_conserves_money_across_crashes_a_kill_and_runs(tmp_path):
    store = tmp_path / "bank"
    first = run_example("bank", *BANK_SIZES, "--seconds", "0.5", "--store", store)
    assert "Opened 20 new accounts" in first
    assert "Total balance before: 20,000 in 20 accounts (issued 20,000): conserved" in first
    # A transfer above the balance is refused with the handler's own RequestError
    # subclass, not a crash, and leaves the account as it was.
    assert re.search(
        r"A transfer of 1,001 from owner 0: refused with InsufficientFunds \(.*\); "
        r"the account is untouched\n", first
    ), first
    assert "Total balance after: 20,000 in 20 accounts (issued 20,000): conserved" in first
    assert number(r"Transfers: ([\d,]+) done", first) > 0
    first_account = re.findall(r"First account: .*", first)[-1]

    # A second run, killed while transfers are in flight: nothing is lost either.
    killed = subprocess.Popen(
        [sys.executable, "-u", str(ROOT / "examples" / "bank.py"), *BANK_SIZES,
         "--seconds", "30", "--store", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert killed.stdout is not None
    watchdog = threading.Timer(60, killed.kill)  # a hung run fails the test, not hangs it
    watchdog.start()
    seen = []
    try:
        for line in killed.stdout:
            seen.append(line)
            if PROGRESS_LINE.match(line):  # the clients are busy transferring
                break
    finally:
        watchdog.cancel()
        killed.kill()  # SIGKILL: no shutdown, no last commit
        killed.wait()
        killed.stdout.close()
    assert PROGRESS_LINE.match(seen[-1]), seen  # killed while it was transferring
    assert "Continuing 20 accounts from" in "".join(seen)
    assert first_account + "\n" in seen  # it continued where the first run ended

    third = run_example("bank", *BANK_SIZES, "--seconds", "0.5", "--store", store)
    assert "Continuing 20 accounts from" in third
    assert "Opened" not in third
    # What the killed run committed is kept; what it left in flight is completed.
    assert sent(third.split("Total balance before")[0]) > sent(first_account)
    assert "Total balance before: 20,000 in 20 accounts (issued 20,000): conserved" in third
    assert "Total balance after: 20,000 in 20 accounts (issued 20,000): conserved" in third


def test_chat_rooms_hibernate_and_wake_with_their_history(tmp_path):
    store = tmp_path / "chat"
    first = run_example("chat", "--quick", "--store", store)
    assert lines_after("Rooms at start:", first, 3) == [
        "  #general: 0 members, 0 messages",
        "  #random: 0 members, 0 messages",
        "  #trio: 0 members, 0 messages",
    ]
    assert "All rooms hibernated (active 0)" in first
    assert "listener streams closed by their room: 24 of 24\n" in first  # 12 users x 2 rooms
    woken = lines_after("Rooms after waking from the store:", first, 3)
    assert sum(number(r" ([\d,]+) messages", line) for line in woken) == 12 * 5
    assert all("; last [" in line for line in woken)  # the history survived hibernation

    second = run_example("chat", "--quick", "--store", store)
    assert lines_after("Rooms at start:", second, 3) == woken
    woken_again = lines_after("Rooms after waking from the store:", second, 3)
    assert sum(number(r" ([\d,]+) messages", line) for line in woken_again) == 2 * 12 * 5


def test_cart_writes_behind_and_checkout_places_orders(tmp_path):
    store = tmp_path / "cart"
    first = run_example("cart", "--quick", "--store", store)
    assert "Order book before: 0 orders" in first
    orders = number(r"orders placed: ([\d,]+)", first)
    abandoned = number(r"carts abandoned: ([\d,]+)", first)
    assert orders + abandoned == 30
    assert orders > 0
    assert f"Order book after: {orders:,} orders" in first
    messages = number(r"Write-behind: ([\d,]+) messages", first)
    written = number(r"([\d,]+) records written in", first)
    commits = number(r"written in ([\d,]+) commits", first)
    assert messages >= 30 * 40
    assert commits < written < messages / 4  # many edits, few writes

    assert "Carts expired so far (all runs): 0;" in first  # they live a day

    second = run_example("cart", "--quick", "--store", store)
    assert f"Order book before: {orders:,} orders" in second
    assert f"carts continued from the last run: {abandoned:,};" in second
    orders_again = number(r"orders placed: ([\d,]+)", second)
    assert f"Order book after: {orders + orders_again:,} orders" in second


def load_example(name: str) -> Any:
    """An example's module, imported (examples import their neighbours by name)."""
    examples = str(Path(__file__).parent.parent / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    return importlib.import_module(name)


async def test_a_cart_nobody_touches_expires_by_its_reminder(autojump_clock):
    cart = load_example("cart")
    async with trio_pgs.PersistentSupervisor(
        store=trio_pgs.MemoryStore(), servers=[cart.CartServer, cart.OrderBookServer],
        name="cart-expiry",
    ) as sup:
        orders = await sup.start(cart.OrderBookServer, cart.OrderBook(), key="orders")
        ann = await sup.start(cart.CartServer, "ann", orders, 60.0, key="cart-ann")
        await ann.call(("add", "tea", 1))
        await trio.sleep(50)
        assert await ann.call(("add", "tea", 1)) == 2  # an edit: 60 s more from now
        await trio.sleep(55)  # dormant meanwhile: the reminder is in the store
        assert sup.statistics().active == 1  # the order book alone
        assert await ann.call("show") == {"tea": 2}
        await trio.sleep(61)  # "show" is no edit: it expires 60 s after the last edit
        with pytest.raises(trio_pgs.ServerNotFound):
            await ann.call("show")
        assert (await orders.call("show")).expired == 1
        assert sup.statistics().reminders == 1


def test_cluster_keeps_every_transfer_when_a_node_is_killed(postgres):
    # The tests' PostgreSQL (TRIO_PGS_POSTGRES_DSN, or a pgserver one), in a schema the
    # fixture drops at the end.
    url = f"{postgres.dsn}{'&' if '?' in postgres.dsn else '?'}schema={postgres.schema()}"
    output = run_example("cluster", "--store", url, timeout=120)
    assert re.search(r"node 3: pid \d+, listening on 127\.0\.0\.1:\d+", output), output
    assert "SIGKILL to node 3" in output
    assert re.search(r"bank +\w+ +\d+ +127\.0\.0\.1:\d+ .* expired ", output), output
    assert number(r"Transfers: ([\d,]+) done", output) > 0
    assert "Total balance: 30,000 in 30 accounts (before: 30,000): conserved\n" in output
    assert "no done transfer lost, none applied twice\n" in output
