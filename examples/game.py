"""A game world on trio-pgs: 10,000 players, a few hundred of them online at a time.

Every player is a persistent server. Each move is committed to the store before the
player sees its new score; a player whose client goes away hibernates after
``--idle`` seconds (its task ends, its state stays on disk) and wakes from the store
when a client picks it again. All the servers' writes go through one writer, which
groups them into shared transactions (the "mean batch" figure).

Run it twice: the first run creates the players in ``game-state/``, the second one
continues every player's score from there. ``--store`` names another directory, or a
PostgreSQL database (``--store postgresql://user@host/db``, with the
``trio-pgs[postgres]`` extra): several runs at once then need one database each, or
one schema each (``postgresql://...?schema=NAME``).

    make demo                              # python examples/game.py
    python examples/game.py --quick        # a short run: 500 players, 3 seconds
    python examples/game.py --help         # players, clients, seconds, idle, store
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from progress_line import progress

import trio_pgs
from trio_pgs import CallResult, CastResult, NoReply, PersistentServer, PersistentSupervisor, Reply

#: How many players are read or created at the same time at startup and at the end.
WORKERS = 200
#: Seconds between two progress lines when the output is not a terminal.
PROGRESS_EVERY = 2.0


@attrs.frozen
class Player:
    """The state of one player: what the store keeps (as JSON)."""

    name: str
    score: int = 0
    games: int = 0


class PlayerServer(PersistentServer[Player]):
    kind = "player"
    idle_timeout = 2.0  # seconds without messages before hibernating

    async def init(self, name: str) -> Player:
        return Player(name)

    async def handle_call(self, request: Any, state: Player) -> CallResult[Player]:
        match request:
            case ("score", int(points)):
                state = attrs.evolve(state, score=state.score + points)
                return Reply(state.score, state)  # committed before the caller sees it
            case "show":
                return Reply(state, state, persist=False)  # a read: nothing to write
        return await super().handle_call(request, state)

    async def handle_cast(self, message: Any, state: Player) -> CastResult[Player]:
        match message:
            case "game-over":
                return NoReply(attrs.evolve(state, games=state.games + 1))
        return await super().handle_cast(message, state)


@attrs.define
class Tally:
    """What the clients did, for the progress lines and the final check."""

    calls: int = 0
    sessions: int = 0
    points: int = 0  # added by the moves whose new score a client has seen
    active_at_end: int = 0  # players in memory when the playing time ended


def player_key(number: int) -> str:
    return f"p{number:06d}"


async def for_every_player(
    players: int, visit: Callable[[int], Awaitable[None]], doing: str
) -> None:
    """Await ``visit(number)`` for every player number, WORKERS at a time, showing how
    many are *doing*."""
    done = 0

    async def worker(first: int) -> None:
        nonlocal done
        for number in range(first, players, WORKERS):
            await visit(number)
            done += 1

    def describe(elapsed: float) -> str:
        return f"  {elapsed:5.1f}s  {doing}: {done:,} of {players:,} players"

    async with progress(describe, every=PROGRESS_EVERY), trio.open_nursery() as nursery:
        for first in range(min(WORKERS, players)):
            nursery.start_soon(worker, first)


async def read_everyone(sup: PersistentSupervisor, players: int) -> list[Player]:
    """Every player's state, read through calls (dormant players wake from the store)."""
    everyone: list[Player] = []

    async def read(number: int) -> None:
        everyone.append(await sup.ref(PlayerServer, player_key(number)).call("show"))

    await for_every_player(players, read, "reading back")
    return everyone


async def open_world(sup: PersistentSupervisor, players: int) -> tuple[int, int]:
    """Read every player, starting those the store does not have yet.

    Returns how many players the store already had, and their total score.
    """
    existing = total_score = 0

    async def open_player(number: int) -> None:
        nonlocal existing, total_score
        ref = sup.ref(PlayerServer, player_key(number))
        try:
            player = await ref.call("show")  # wakes the player from the store
        except trio_pgs.ServerNotFound:
            await sup.start(PlayerServer, f"player {number}", key=ref.key)  # a new player
        else:
            existing += 1
            total_score += player.score

    await for_every_player(players, open_player, "opening")
    return existing, total_score


async def play_sessions(
    sup: PersistentSupervisor, players: int, deadline: float, tally: Tally
) -> None:
    """One client: log in as a random player, play a few moves, leave; repeat."""
    while trio.current_time() < deadline:
        player = sup.ref(PlayerServer, player_key(random.randrange(players)))
        for _ in range(random.randint(3, 8)):
            points = random.randint(1, 10)
            await player.call(("score", points))
            tally.calls += 1
            tally.points += points
            await trio.sleep(random.uniform(0.01, 0.05))  # thinking about the next move
        await player.cast("game-over")
        tally.sessions += 1
        await trio.sleep(random.uniform(0.1, 0.5))  # away between two sessions


async def play(
    sup: PersistentSupervisor, players: int, clients: int, seconds: float
) -> Tally:
    """Run *clients* concurrent clients for *seconds*, showing their progress."""
    tally = Tally()
    deadline = trio.current_time() + seconds

    def describe(elapsed: float) -> str:
        stats = sup.statistics()
        return (
            f"  {elapsed:5.1f}s  {tally.calls:7,} moves ({tally.calls / elapsed:5,.0f}/s)"
            f"  active now {stats.active:5,}"
            f"  so far: {stats.hibernations:6,} hibernations,"
            f" {stats.commits:5,} commits of {stats.mean_batch_size:4.1f} records"
        )

    async def at_the_deadline() -> None:
        await trio.sleep_until(deadline)
        tally.active_at_end = sup.statistics().active

    async with progress(describe, every=PROGRESS_EVERY), trio.open_nursery() as clients_nursery:
        clients_nursery.start_soon(at_the_deadline)
        for _ in range(clients):
            clients_nursery.start_soon(play_sessions, sup, players, deadline, tally)
    print(f"Played {tally.calls:,} moves in {tally.sessions:,} sessions")
    return tally


async def wait_for_hibernation(sup: PersistentSupervisor, idle: float) -> None:
    """Wait until every player has hibernated: *idle* seconds after its last message."""

    def describe(elapsed: float) -> str:
        return f"  {elapsed:5.1f}s  waiting for the players to hibernate: " \
               f"{sup.statistics().active:,} still active"

    async with progress(describe, every=PROGRESS_EVERY):
        with trio.fail_after(idle + 10):
            while sup.statistics().active:
                await trio.sleep(0.05)


def print_statistics(stats: trio_pgs.SupervisorStatistics) -> None:
    print(
        "Supervisor statistics:\n"
        f"  active now: {stats.active:,} servers\n"
        f"  so far: {stats.activations:,} activations, {stats.hibernations:,} "
        f"hibernations, {stats.crashes:,} crashes, {stats.messages:,} messages handled\n"
        f"  written so far: {stats.records_written:,} records in {stats.commits:,} "
        f"commits (mean batch size {stats.mean_batch_size:.1f})"
    )


def print_what_it_showed(
    players: int, tally: Tally, gained: int, stats: trio_pgs.SupervisorStatistics
) -> None:
    print(
        "What this run showed:\n"
        f"  - Hibernation: when the playing time ended, {tally.active_at_end:,} of the "
        f"{players:,} players were in memory;\n"
        f"    the others slept on disk, and woke from the store when a client picked them "
        f"again.\n"
        f"  - Commits: every move was committed before its client saw the new score: "
        f"reading every\n"
        f"    player back finds exactly the {gained:,} points of the {tally.calls:,} moves "
        f"the clients saw.\n"
        f"  - Group commit: {stats.records_written:,} records in {stats.commits:,} "
        f"transactions, {stats.mean_batch_size:.1f} per transaction.\n"
        f"  - Every player hibernated at the end ({stats.active} active): all of it is "
        f"on disk."
    )


def open_store(spec: str) -> trio_pgs.Store:
    """A directory's DiskCacheStore, or a PostgresStore for a ``postgresql://`` URL (a
    ``schema`` query parameter names its schema)."""
    if not spec.startswith(("postgresql://", "postgres://")):
        return trio_pgs.DiskCacheStore(spec)
    parts = urllib.parse.urlsplit(spec)
    query = urllib.parse.parse_qsl(parts.query)
    schema = dict(query).get("schema")
    if schema is None:
        return trio_pgs.PostgresStore(spec)
    rest = urllib.parse.urlencode([(name, value) for name, value in query if name != "schema"])
    return trio_pgs.PostgresStore(urllib.parse.urlunsplit(parts._replace(query=rest)),
                                  schema=schema)


async def main(players: int, seconds: float, clients: int, idle: float, spec: str) -> None:
    store = open_store(spec)
    print(f"A world of {players:,} players in {store!r}, {clients} clients online at a time")
    async with PersistentSupervisor(
        store=store, servers=[PlayerServer], idle_timeout=idle
    ) as sup:
        existing, total_before = await open_world(sup, players)
        if existing:
            print(f"Continuing {existing:,} players from {store!r}")
        if existing < players:
            print(f"Created {players - existing:,} new players")
        print(f"Total score before playing: {total_before:,}")

        tally = await play(sup, players, clients, seconds)

        everyone = await read_everyone(sup, players)
        total = sum(player.score for player in everyone)
        print(f"Total score after playing: {total:,} (+{total - total_before:,})")
        if total - total_before != tally.points:
            raise SystemExit(f"the moves the clients saw added {tally.points:,} points, "
                             f"the store has {total - total_before:+,}")
        top = sorted(everyone, key=lambda player: player.score, reverse=True)[:3]
        for place, player in enumerate(top, 1):
            print(f"  #{place} {player.name}: {player.score} points in {player.games} games")
        await wait_for_hibernation(sup, idle)  # everyone logged off
    stats = sup.statistics()
    print_statistics(stats)
    print_what_it_showed(players, tally, total - total_before, stats)
    print("Run it again: every score continues from the store.")


def _count(text: str) -> int:
    """A number of players or clients: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    """A duration: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Run it twice: the second run continues every score from the store.",
    )
    parser.add_argument("--players", type=_count, default=10_000,
                        help="Players in the world (default: %(default)s).")
    parser.add_argument("--clients", type=_count, default=300,
                        help="Clients online at a time, each playing one session after "
                             "another (default: %(default)s).")
    parser.add_argument("--seconds", type=_seconds, default=20.0,
                        help="How long the clients play, in seconds (default: %(default)s).")
    parser.add_argument("--idle", type=_seconds, default=PlayerServer.idle_timeout,
                        help="Seconds without a move before a player hibernates "
                             "(default: %(default)s).")
    parser.add_argument("--store", default="game-state",
                        help="The store: a directory, or a postgresql:// URL "
                             "(default: %(default)s).")
    parser.add_argument("--quick", action="store_true",
                        help="A short run: 500 players, 50 clients, 3 seconds, idle 0.5 "
                             "seconds (the options given as well win).")
    if parser.parse_known_args()[0].quick:  # the defaults of a short run
        parser.set_defaults(players=500, clients=50, seconds=3.0, idle=0.5)
    return parser.parse_args()


if __name__ == "__main__":
    options = parse_args()
    try:
        trio.run(main, options.players, options.seconds, options.clients, options.idle,
                 options.store)
    except BaseException as exc:  # Ctrl-C: every score so far is in the store
        split = getattr(exc, "subgroup", None)  # the clients' nursery may group it
        if not isinstance(exc, KeyboardInterrupt) and (
            split is None or split(KeyboardInterrupt) is None
        ):
            raise
        print("\ninterrupted; run it again to continue", file=sys.stderr)
        sys.exit(130)
