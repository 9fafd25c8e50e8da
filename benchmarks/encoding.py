"""Encoding a typical game-player state: cattrs' JSON preconf converter (stdlib json)
against its orjson preconf converter, in the same run.

    python benchmarks/encoding.py
"""

from __future__ import annotations

import datetime
import statistics
import timeit

import attrs
from cattrs.preconf.json import make_converter as make_json
from cattrs.preconf.orjson import make_converter as make_orjson


@attrs.frozen
class Item:
    name: str
    power: int
    enchanted: bool


@attrs.frozen
class Player:
    name: str
    score: int
    level: int
    joined: datetime.datetime
    inventory: tuple[Item, ...]
    friends: frozenset[str]
    position: tuple[float, float]


PLAYER = Player(
    "player 4242", 12_345, 17, datetime.datetime(2026, 11, 24, tzinfo=datetime.timezone.utc),
    tuple(Item(f"item {i}", i * 3, i % 2 == 0) for i in range(12)),
    frozenset(f"friend {i}" for i in range(8)), (12.5, -3.25),
)


def measure(label: str, fn, number: int = 20_000) -> float:
    rounds = [number / timeit.timeit(fn, number=number) for _ in range(5)]
    return statistics.median(rounds)


def main() -> None:
    json_c, orjson_c = make_json(), make_orjson()
    json_bytes = json_c.dumps(PLAYER).encode()
    orjson_bytes = orjson_c.dumps(PLAYER)
    rows = [
        ("encode", measure("json", lambda: json_c.dumps(PLAYER).encode()),
         measure("orjson", lambda: orjson_c.dumps(PLAYER))),
        ("decode", measure("json", lambda: json_c.loads(json_bytes, Player)),
         measure("orjson", lambda: orjson_c.loads(orjson_bytes, Player))),
    ]
    print(f"state of {len(json_bytes)} bytes (json) / {len(orjson_bytes)} bytes (orjson)")
    print(f"{'':8}{'cattrs+json /s':>16}{'cattrs+orjson /s':>18}{'ratio':>8}")
    for name, std, fast in rows:
        print(f"{name:8}{std:16,.0f}{fast:18,.0f}{fast / std:8.2f}")


if __name__ == "__main__":
    main()
