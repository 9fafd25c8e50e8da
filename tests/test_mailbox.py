"""The mailbox on its own: what a server's senders and its task see of it."""

from __future__ import annotations

import contextlib
import inspect
import linecache
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from trio_pgs._mailbox import Mailbox


async def test_items_come_out_in_order_and_an_empty_mailbox_says_so() -> None:
    box: Mailbox[str] = Mailbox(4)
    assert box.next_queued() is None
    with pytest.raises(trio.WouldBlock):
        box.receive_nowait()
    for item in "abc":
        box.send_nowait(item)
    assert len(box) == 3
    assert [box.receive_nowait(), box.next_queued(), await box.receive()] == list("abc")
    assert len(box) == 0


async def test_a_full_mailbox_refuses_send_nowait_and_keeps_what_it_has() -> None:
    box: Mailbox[int] = Mailbox(2)
    box.send_nowait(1)
    box.send_nowait(2)
    with pytest.raises(trio.WouldBlock):
        box.send_nowait(3)
    assert [box.receive_nowait(), box.receive_nowait()] == [1, 2]


async def test_a_waiting_sender_is_told_when_its_item_is_let_in_before_it_resumes() -> None:
    """`send(item, admitted)`: *admitted* runs the moment room lets the item in, in the
    receiver's step (before the sender resumes); never for a sender that did not wait
    or that gave up."""
    box: Mailbox[str] = Mailbox(1)
    told: list[str] = []
    await box.send("first", lambda: told.append("first"))  # room: no wait, not told
    resumed = []

    async def sender(item: str, scope: trio.CancelScope) -> None:
        with scope:
            await box.send(item, lambda: told.append(item))
            resumed.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, "second", trio.CancelScope())
        await trio.testing.wait_all_tasks_blocked()
        gave_up = trio.CancelScope()
        nursery.start_soon(sender, "never", gave_up)  # queued behind "second"
        await trio.testing.wait_all_tasks_blocked()
        gave_up.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert box.receive_nowait() == "first"
        assert told == ["second"] and resumed == []  # let in, not resumed yet
    assert resumed == ["second"]
    assert box.receive_nowait() == "second"
    assert box.next_queued() is None


async def test_a_waiting_receiver_gets_the_item_at_once() -> None:
    box: Mailbox[str] = Mailbox(1)
    got: list[str] = []

    async def receive() -> None:
        got.append(await box.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert box.receiver_waiting
        box.send_nowait("x")
        box.send_nowait("y")  # queued: the receiver took "x" directly
        assert not box.receiver_waiting
    assert got == ["x"]
    assert box.receive_nowait() == "y"


async def test_blocked_senders_get_in_in_the_order_they_came() -> None:
    box: Mailbox[int] = Mailbox(1)
    box.send_nowait(0)
    sent: list[int] = []

    async def send(item: int) -> None:
        await box.send(item)
        sent.append(item)

    async with trio.open_nursery() as nursery:
        for item in (1, 2, 3):
            nursery.start_soon(send, item)
            await trio.testing.wait_all_tasks_blocked()
        assert box.senders_waiting == 3
        with pytest.raises(trio.WouldBlock):
            box.send_nowait(9)  # no overtaking the waiting senders
        received = [await box.receive() for _ in range(4)]
    assert received == [0, 1, 2, 3]
    assert sent == [1, 2, 3]
    assert len(box) == 0 and box.senders_waiting == 0


async def test_a_cancelled_sender_leaves_nothing_behind() -> None:
    box: Mailbox[int] = Mailbox(1)
    box.send_nowait(0)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def send() -> None:
            with scope:
                await box.send(1)

        nursery.start_soon(send)
        nursery.start_soon(box.send, 2)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert box.senders_waiting == 1
        assert [await box.receive(), await box.receive()] == [0, 2]
    assert box.next_queued() is None


async def test_a_cancelled_receiver_leaves_room_for_the_next() -> None:
    box: Mailbox[int] = Mailbox(1)
    with trio.move_on_after(0.01):
        await box.receive()
    assert not box.receiver_waiting
    box.send_nowait(1)  # queued, not handed to the task that left
    assert await box.receive() == 1


async def test_send_and_receive_are_checkpoints() -> None:
    box: Mailbox[int] = Mailbox(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await box.send(1)
    assert len(box) == 0  # a cancelled send sends nothing
    box.send_nowait(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await box.receive()
    assert box.receive_nowait() == 1  # nor does a cancelled receive take anything
    with trio.testing.assert_checkpoints():
        await box.send(2)
    with trio.testing.assert_checkpoints():
        assert await box.receive() == 2


async def test_a_second_receiver_is_refused() -> None:
    box: Mailbox[int] = Mailbox(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await box.receive()
        box.send_nowait(1)


def test_a_mailbox_holds_at_least_one_message() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Mailbox(0)


@contextlib.contextmanager
def _ctrl_c_before(function: Any, text: str) -> Iterator[None]:
    """A SIGINT raised inside *function*, just before its line that contains *text*
    runs (trio's handler then decides: deliver it at a checkpoint, or raise it there)."""
    code = inspect.unwrap(function).__code__

    def in_function(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and text in linecache.getline(code.co_filename, frame.f_lineno):
            signal.raise_signal(signal.SIGINT)
        return in_function

    def calls(frame: Any, event: str, arg: Any) -> Any:
        return in_function if frame.f_code is code else None

    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(None)


def test_a_ctrl_c_while_a_message_is_handed_over_strands_no_task() -> None:
    """As trio's channels, the mailbox is protected from KeyboardInterrupt: a Ctrl-C
    landing between taking the waiting receiver and waking it is delivered at the
    sender's next checkpoint, and the receiver still gets the message."""
    got: list[str] = []

    async def main() -> None:
        box: Mailbox[str] = Mailbox(1)

        async def receive() -> None:
            got.append(await box.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            with _ctrl_c_before(Mailbox.send_nowait, "reschedule("):
                box.send_nowait("x")
            await trio.sleep(1)

    with pytest.raises(BaseException) as raised:
        trio.run(main)
    assert _ctrl_c_in(raised.value)
    assert got == ["x"]


def _ctrl_c_in(error: BaseException) -> bool:
    """Whether *error* is a KeyboardInterrupt, or a group holding one."""
    if isinstance(error, KeyboardInterrupt):
        return True
    return any(_ctrl_c_in(inner) for inner in getattr(error, "exceptions", ()))
