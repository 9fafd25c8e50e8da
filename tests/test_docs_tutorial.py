"""docs/tutorial.md runs as written: its python blocks, in order, are one program whose
output on a first and a second run is the tutorial's two ``text`` blocks."""

from __future__ import annotations

import re
from pathlib import Path

import trio
import trio.testing

TUTORIAL = Path(__file__).parent.parent / "docs" / "tutorial.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(TUTORIAL.read_text()) if lang == language]


def load_program() -> dict[str, object]:
    source = "\n".join(blocks("python"))
    namespace: dict[str, object] = {"__name__": "tutorial_game"}
    exec(compile(source, str(TUTORIAL), "exec"), namespace)
    return namespace


def run_main(program: dict[str, object]) -> None:
    # Virtual time: the tutorial's trio.sleep(1.5) and idle timeout pass at once.
    trio.run(program["main"], clock=trio.testing.MockClock(autojump_threshold=0))


def test_tutorial_has_the_blocks_this_test_reads():
    assert len(blocks("python")) == 6
    assert len(blocks("text")) == 2


def test_tutorial_program_prints_what_the_tutorial_shows_on_two_runs(
    tmp_path, monkeypatch, capsys
):
    first_run, second_run = blocks("text")
    monkeypatch.chdir(tmp_path)  # the program keeps its store in ./game-state
    program = load_program()

    run_main(program)
    assert capsys.readouterr().out == first_run

    run_main(program)  # a new supervisor on the same directory: a program restart
    assert capsys.readouterr().out == second_run
    assert (tmp_path / "game-state").is_dir()
