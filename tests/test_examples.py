"""The examples run, so they never rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_game(store: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "game.py"), "--quick", "--store", str(store)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert result.stderr == ""
    return result.stdout


def test_game_demo_runs_and_a_second_run_continues_the_scores(tmp_path):
    first = run_game(tmp_path / "game")
    assert "Total score before playing: 0\n" in first
    after_first = first.split("Total score after playing: ")[1].split(" ")[0]
    second = run_game(tmp_path / "game")
    assert "Continuing 500 players" in second
    assert f"Total score before playing: {after_first}\n" in second
    assert "mean batch size" in second
