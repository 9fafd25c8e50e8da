"""The how-to pages' code runs as written: in docs/howto/testing.md,
docs/howto/migrations.md and docs/howto/reminders.md, a block that starts with a file
name comment (``# conftest.py``) begins that file, and the python blocks after it, up
to the next named one, continue it (a ``py`` block is an excerpt of an example, not
run here). The files make a new project whose tests pass under pytest, with
``trio_pgs.testing.pytest_plugin`` enabled the way the page tells users to."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HOWTO = Path(__file__).parent.parent / "docs" / "howto"
PAGES = ["testing.md", "migrations.md", "reminders.md"]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
FILE_COMMENT = re.compile(r"# ([\w.]+\.(?:py|toml))\n")


def files_from(pages: list[str]) -> dict[str, str]:
    """The text of each file that the blocks of *pages* make up."""
    files: dict[str, str] = {}
    for page in pages:
        current = None  # blocks before a page's first named one stand alone
        for language, body in FENCE.findall((HOWTO / page).read_text()):
            named = FILE_COMMENT.match(body)
            if named is not None:
                current = named[1]
            elif current is None or language != "python":
                continue
            files[current] = files.get(current, "") + "\n" + body
    return files


def test_howto_pages_name_the_files_this_test_writes():
    assert sorted(files_from(PAGES)) == [
        "conftest.py", "counter.py", "energy.py", "player.py", "pyproject.toml",
        "test_counter.py", "test_energy.py", "test_player.py",
    ]


def test_howto_code_passes_as_a_users_project_with_the_pytest_plugin(tmp_path):
    for name, text in files_from(PAGES).items():
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 passed" in result.stdout, result.stdout
