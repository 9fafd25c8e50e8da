"""A game world on trio-pgs: 10,000 players, a few hundred online at any moment.

Every player is a persistent server. Its score is committed to the store after each
move, it hibernates when its player goes away (its task ends, its state stays on
disk), and it wakes from the store when the player comes back. Run it twice: the
second run continues every player's score from ``game-state/``.

    make demo                      # or: python examples/game.py
    python examples/game.py --quick   # a short run
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import attrs
import trio

import trio_pgs
from trio_pgs import NoReply, PersistentServer, PersistentSupervisor, Reply


@attrs.frozen
class Player:
    name: str
    score: int = 0
    games: int = 0


class PlayerServer(PersistentServer[Player]):
    kind = "player"

    async def init(self, name: str) -> Player:
        return Player(name)

    async def handle_call(self, request: Any, state: Player) -> Any:
        match request:
            case ("score", points):
                state = attrs.evolve(state, score=state.score + points)
                return Reply(state.score, state)
            case "show":
                return Reply(state, state, persist=False)
        return await super().handle_call(request, state)

    async def handle_cast(self, message: Any, state: Player) -> Any:
        match message:
            case "game-over":
                return NoReply(attrs.evolve(state, games=state.games + 1))
        return await super().handle_cast(message, state)


def player_key(number: int) -> str:
    return f"p{number:06d}"


async def create_world(sup: PersistentSupervisor, players: int) -> int:
    """Start the players that are not in the store yet; return how many existed."""
    existing = 0
    for number in range(players):
        key = player_key(number)
        try:
            await sup.start(PlayerServer, f"player {number}", key=key)
        except trio_pgs.AlreadyStarted:
            existing += 1
    return existing


async def play_sessions(sup: PersistentSupervisor, players: int, deadline: float,
                        counter: list[int]) -> None:
    """One client: log in as a random player, play a few moves, leave, repeat."""
    while trio.current_time() < deadline:
        ref = sup.ref(PlayerServer, player_key(random.randrange(players)))
        for _ in range(random.randint(3, 8)):
            await ref.call(("score", random.randint(1, 10)))
            counter[0] += 1
            await trio.sleep(random.uniform(0.01, 0.05))  # thinking
        await ref.cast("game-over")
        await trio.sleep(random.uniform(0.1, 0.5))  # between sessions


async def report_progress(sup: PersistentSupervisor, started: float, counter: list[int]) -> None:
    while True:
        await trio.sleep(2)
        stats = sup.statistics()
        elapsed = time.monotonic() - started
        print(
            f"  {elapsed:5.1f}s  moves {counter[0]:7d} ({counter[0] / elapsed:6.0f}/s)  "
            f"online {stats.active:4d}  hibernations {stats.hibernations:6d}  "
            f"commits {stats.commits:6d}  mean batch {stats.mean_batch_size:5.1f}"
        )


async def leaderboard(sup: PersistentSupervisor, players: int) -> tuple[int, list[Player]]:
    """Read every player (waking the dormant ones) for the total and the top 3."""
    everyone = []
    for number in range(players):
        everyone.append(await sup.ref(PlayerServer, player_key(number)).call("show"))
    everyone.sort(key=lambda player: player.score, reverse=True)
    return sum(player.score for player in everyone), everyone[:3]


async def main(players: int, seconds: float, clients: int, idle: float, store: str) -> None:
    print(f"A world of {players:,} players in {store!r}, {clients} online at a time")
    async with PersistentSupervisor(
        store=trio_pgs.DiskCacheStore(store), servers=[PlayerServer], idle_timeout=idle
    ) as sup:
        existing = await create_world(sup, players)
        if existing:
            print(f"Continuing {existing:,} players from {store!r}")
        total_before, _ = await leaderboard(sup, players)
        print(f"Total score before playing: {total_before:,}")
        started, counter = time.monotonic(), [0]
        deadline = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report_progress, sup, started, counter)
            async with trio.open_nursery() as clients_nursery:
                for _ in range(clients):
                    clients_nursery.start_soon(play_sessions, sup, players, deadline, counter)
            nursery.cancel_scope.cancel()
        total, top = await leaderboard(sup, players)
        print(f"Total score after playing: {total:,} (+{total - total_before:,})")
        for place, player in enumerate(top, 1):
            print(f"  #{place} {player.name}: {player.score} points in {player.games} games")
        await trio.sleep(idle + 0.5)  # everyone logs off: the players hibernate
        stats = sup.statistics()
    print(
        "Supervisor statistics:\n"
        f"  active {stats.active}, hibernated {stats.hibernations}, "
        f"activations {stats.activations}, crashes {stats.crashes}\n"
        f"  messages {stats.messages}, commits {stats.commits}, "
        f"records written {stats.records_written}, "
        f"mean batch size {stats.mean_batch_size:.1f}"
    )
    print("Run it again: every score continues from the store.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--players", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--idle", type=float, default=2.0, help="idle_timeout of a player")
    parser.add_argument("--store", default="game-state")
    parser.add_argument("--quick", action="store_true", help="a short run (for the tests)")
    args = parser.parse_args()
    if args.quick:
        args.players, args.seconds, args.clients, args.idle = 500, 3.0, 50, 0.5
    return args


if __name__ == "__main__":
    options = parse_args()
    trio.run(main, options.players, options.seconds, options.clients, options.idle,
             options.store)
