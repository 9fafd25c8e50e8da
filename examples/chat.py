"""Chat rooms on trio-pgs: rooms that hibernate when idle and wake with their history.

Every room is a persistent server. Its members and its last messages are committed
after every change; the clients listening to it right now are not: a listener's
memory channel only means something in this process, so it lives in an ephemeral field
of the state (``trio_pgs.ephemeral``), which is never stored and starts empty at every
activation. When a room hibernates it closes its listeners' channels: their clients
see the end of the stream, as they would if the process restarted, and listen again
when they need to.

Run it twice: the second run finds every room's members and history in
``chat-state/`` and goes on numbering the messages.

    python examples/chat.py                 # 5 rooms, 40 users, 20 posts each
    python examples/chat.py --quick         # a short run: 3 rooms, 12 users, 5 posts
    python examples/chat.py --help          # rooms, users, posts, idle, store
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

import attrs
import trio
from progress_line import progress

import trio_pgs
from trio_pgs import CallResult, PersistentServer, PersistentSupervisor, Reply, ServerRef

#: Messages a room keeps; older ones are forgotten (the count goes on).
HISTORY = 20
#: Messages a listener may fall behind before the room disconnects it: a slow client
#: must never make the room wait.
LISTENER_BUFFER = 100
ROOM_NAMES = ["general", "random", "trio", "python", "help", "music", "games", "news"]
WORDS = "hello trio nursery cancel scope channel server store commit hibernate wake".split()


@attrs.frozen
class Message:
    number: int  # the room's running count: it goes on across runs
    author: str
    text: str

    def __str__(self) -> str:
        return f"[{self.number}] {self.author}: {self.text}"


@attrs.frozen
class Room:
    """The state of one room. Everything but ``listeners`` is stored (as JSON)."""

    name: str
    members: frozenset[str] = frozenset()
    history: tuple[Message, ...] = ()  # the last HISTORY messages, oldest first
    posted: int = 0
    #: Who listens now, and the channel to them: never stored (a channel cannot be),
    #: empty again after every activation. (ruff takes ephemeral() for a plain call.)
    listeners: dict[str, trio.MemorySendChannel[Message]] = trio_pgs.ephemeral(
        factory=dict
    )


class RoomServer(PersistentServer[Room]):
    kind = "chat.room"
    idle_timeout = 1.0  # seconds without a message before the room hibernates

    async def init(self, name: str) -> Room:
        return Room(name)

    async def handle_call(self, request: Any, state: Room) -> CallResult[Room]:
        match request:
            case ("join", str(user)):
                state = attrs.evolve(state, members=state.members | {user})
                return Reply(state.history, state)  # a newcomer sees the recent history
            case ("leave", str(user)):
                listeners = dict(state.listeners)
                if user in listeners:
                    listeners.pop(user).close()  # their stream ends
                state = attrs.evolve(state, members=state.members - {user}, listeners=listeners)
                return Reply(None, state)
            case ("listen", str(user)):
                if user not in state.members:
                    return Reply(None, state)  # members only
                send, receive = trio.open_memory_channel[Message](LISTENER_BUFFER)
                listeners = dict(state.listeners)
                if user in listeners:
                    listeners[user].close()  # one stream per user: the newest wins
                listeners[user] = send
                # Only an ephemeral field changed: the stored form is the same, so
                # nothing is written.
                return Reply(receive, attrs.evolve(state, listeners=listeners))
            case ("post", str(user), str(text)):
                if user not in state.members:
                    return Reply(None, state)  # members only: not posted
                message = Message(state.posted + 1, user, text)
                state = attrs.evolve(
                    state,
                    history=(*state.history, message)[-HISTORY:],
                    posted=message.number,
                    listeners=self.deliver(message, state.listeners),
                )
                return Reply(message.number, state)  # committed before the poster hears
            case "show":
                return Reply(state, state)
        return await super().handle_call(request, state)

    def deliver(
        self, message: Message, listeners: dict[str, trio.MemorySendChannel[Message]]
    ) -> dict[str, trio.MemorySendChannel[Message]]:
        """Send *message* to every listener; return those still connected.

        Listeners get it before the room commits it: if that commit failed, they would
        have seen a message the room forgets. For a chat that is acceptable.
        """
        connected = {}
        for user, send in listeners.items():
            try:
                send.send_nowait(message)
            except trio.WouldBlock:
                send.close()  # too slow: disconnected rather than waited for
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            else:
                connected[user] = send
        return connected

    async def terminate(self, reason: Any, state: Room) -> None:
        # Hibernation, a crash or a shutdown: the channels die with this activation, so
        # tell the listeners now rather than leave them waiting on a dead room.
        for send in state.listeners.values():
            send.close()


@attrs.define
class Tally:
    """What the clients did and saw."""

    posts: int = 0
    listeners: int = 0
    received: int = 0
    disconnected: int = 0


def user_name(number: int) -> str:
    return f"user{number:03d}"


async def open_rooms(sup: PersistentSupervisor, rooms: int) -> list[ServerRef]:
    """Every room, started if the store does not have it yet."""
    refs = []
    for number in range(rooms):
        name = ROOM_NAMES[number] if number < len(ROOM_NAMES) else f"room{number}"
        try:
            refs.append(await sup.start(RoomServer, name, key=name))
        except trio_pgs.AlreadyStarted as exc:
            refs.append(exc.ref)  # an earlier run created it: it wakes from the store
    return refs


async def show_rooms(refs: Sequence[ServerRef]) -> None:
    """Print each room's members and last message (a dormant room wakes to answer)."""
    for ref in refs:
        room = await ref.call("show")
        last = f"; last {room.history[-1]}" if room.history else ""
        print(f"  #{room.name}: {len(room.members)} members, {room.posted} messages{last}")


async def listen(
    room: ServerRef, user: str, tally: Tally, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """A connected client: count what the room sends until the room closes the stream."""
    receive = await room.call(("listen", user))
    tally.listeners += 1
    task_status.started()
    async with receive:
        async for _message in receive:
            tally.received += 1
    tally.disconnected += 1


async def chat(user: str, rooms: Sequence[ServerRef], posts: int, tally: Tally,
               listeners: trio.Nursery) -> None:
    """One user: join two rooms, listen to them, post, and maybe leave one."""
    joined = random.sample(rooms, min(2, len(rooms)))
    for room in joined:
        await room.call(("join", user))
        await listeners.start(listen, room, user, tally)
    for _ in range(posts):
        await trio.sleep(random.uniform(0.01, 0.1))  # typing
        text = " ".join(random.choices(WORDS, k=random.randint(2, 6)))
        await random.choice(joined).call(("post", user, text))
        tally.posts += 1
    if random.random() < 0.25:
        await joined[0].call(("leave", user))


def print_statistics(stats: trio_pgs.SupervisorStatistics) -> None:
    print(
        "Supervisor statistics:\n"
        f"  active now: {stats.active:,} servers\n"
        f"  so far: {stats.activations:,} activations, {stats.hibernations:,} "
        f"hibernations, {stats.crashes:,} crashes, {stats.messages:,} messages handled\n"
        f"  written so far: {stats.records_written:,} records in {stats.commits:,} "
        f"commits (mean batch size {stats.mean_batch_size:.1f})"
    )


async def main(rooms: int, users: int, posts: int, idle: float, store: str) -> None:
    print(f"{rooms} chat rooms in {store!r}, {users} users posting {posts} messages each")
    async with PersistentSupervisor(
        store=trio_pgs.DiskCacheStore(store), servers=[RoomServer], idle_timeout=idle
    ) as sup:
        refs = await open_rooms(sup, rooms)
        print("Rooms at start:")
        await show_rooms(refs)

        tally = Tally()

        def describe(elapsed: float) -> str:
            return (f"  {elapsed:4.1f}s  {tally.posts:,} of {users * posts:,} messages "
                    f"posted; {tally.received:,} received by listeners")

        async with trio.open_nursery() as listeners:
            async with progress(describe), trio.open_nursery() as users_nursery:
                for number in range(users):
                    users_nursery.start_soon(chat, user_name(number), refs, posts, tally,
                                             listeners)
            print(f"Posted {tally.posts:,} messages; {tally.listeners:,} listeners "
                  f"received {tally.received:,}")
            # Nobody posts any more: every room hibernates after `idle` seconds and
            # closes its listeners' channels, which ends the listener tasks.
            with trio.fail_after(idle + 5):
                while sup.statistics().active:
                    await trio.sleep(0.1)
        print(f"All rooms hibernated (active {sup.statistics().active}); "
              f"listener streams closed by their room: {tally.disconnected:,} "
              f"of {tally.listeners:,}")

        print("Rooms after waking from the store:")
        await show_rooms(refs)
    stats = sup.statistics()
    print_statistics(stats)
    print(
        "What this run showed:\n"
        f"  - Every room hibernated when idle ({stats.hibernations:,} hibernations) and "
        f"woke from the store\n"
        f"    with its members and its history to answer the last calls.\n"
        f"  - The listeners' channels lived in an ephemeral field: never stored, and "
        f"closed by their room\n"
        f"    when it hibernated ({tally.disconnected:,} of {tally.listeners:,} streams "
        f"ended that way)."
    )
    print("Run it again: the rooms continue with their members and history.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Run it twice: the rooms continue with their members and history.",
    )
    parser.add_argument("--rooms", type=int, default=5,
                        help="Chat rooms (default: %(default)s).")
    parser.add_argument("--users", type=int, default=40,
                        help="Users, each joining two rooms (default: %(default)s).")
    parser.add_argument("--posts", type=int, default=20,
                        help="Messages each user posts (default: %(default)s).")
    parser.add_argument("--idle", type=float, default=RoomServer.idle_timeout,
                        help="Seconds without a message before a room hibernates "
                             "(default: %(default)s).")
    parser.add_argument("--store", default="chat-state",
                        help="The store's directory (default: %(default)s).")
    parser.add_argument("--quick", action="store_true",
                        help="A short run: 3 rooms, 12 users, 5 posts each, idle 0.5 "
                             "seconds.")
    args = parser.parse_args()
    if args.quick:
        args.rooms, args.users, args.posts, args.idle = 3, 12, 5, 0.5
    return args


if __name__ == "__main__":
    options = parse_args()
    trio.run(main, options.rooms, options.users, options.posts, options.idle, options.store)
