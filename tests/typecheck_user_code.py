"""Type-check code as a user writes it: the examples and the tutorial's program pass
``mypy --strict``. `make test` runs this (``python -m tests.typecheck_user_code``).

mypy runs from a temporary directory, not from the repository, so it finds trio_pgs the
way it finds it for a user's program in this venv: through the installed package (an
install that only an import hook can follow fails here), not the working directory.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.test_docs_tutorial import blocks

ROOT = Path(__file__).parent.parent


def main() -> int:
    examples = sorted((ROOT / "examples").glob("*.py"))
    with tempfile.TemporaryDirectory() as directory:
        tutorial = Path(directory) / "tutorial_game.py"
        tutorial.write_text("\n".join(blocks("python")))
        command = [
            sys.executable, "-m", "mypy", "--strict",
            # a cache per venv: what mypy finds depends on the venv's install
            "--cache-dir", str(Path(sys.prefix) / ".mypy_cache-user-code"),
            str(tutorial), *map(str, examples),
        ]
        print("mypy --strict:", "docs/tutorial.md,", ", ".join(
            str(path.relative_to(ROOT)) for path in examples
        ))
        return subprocess.run(command, cwd=directory).returncode


if __name__ == "__main__":
    sys.exit(main())
