"""Type-check code as a user writes it: the examples and the tutorial's program pass
``mypy --strict``, and in tests/typing_cases/ mypy reports an error on every line
marked ``# error`` and on no other. `make test` runs this
(``python -m tests.typecheck_user_code``).

mypy runs from a temporary directory, not from the repository, so it finds trio_pgs the
way it finds it for a user's program in this venv: through the installed package (an
install that only an import hook can follow fails here), not the working directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.test_docs_tutorial import blocks

ROOT = Path(__file__).parent.parent


def mypy(paths: list[Path], directory: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
        # a cache per venv: what mypy finds depends on the venv's install
        "--cache-dir", str(Path(sys.prefix) / ".mypy_cache-user-code"),
        *map(str, paths),
    ]
    return subprocess.run(command, cwd=directory, capture_output=True, text=True)


def user_code(directory: str) -> bool:
    examples = sorted((ROOT / "examples").glob("*.py"))
    tutorial = Path(directory) / "tutorial_game.py"
    tutorial.write_text("\n".join(blocks("python")))
    print("mypy --strict:", "docs/tutorial.md,", ", ".join(
        str(path.relative_to(ROOT)) for path in examples
    ))
    result = mypy([tutorial, *examples], directory)
    print(result.stdout, end="")
    return result.returncode == 0


def cases(directory: str) -> bool:
    """The refusals: the lines marked ``# error`` are exactly the lines reported."""
    paths = sorted((ROOT / "tests" / "typing_cases").glob("*.py"))
    print("mypy --strict, errors where marked:", ", ".join(
        str(path.relative_to(ROOT)) for path in paths
    ))
    expected = {
        (str(path), number)
        for path in paths
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.rstrip().endswith("# error")
    }
    result = mypy(paths, directory)
    reported = {
        (path, int(number))
        for path, number in re.findall(r"^(.+?):(\d+): error:", result.stdout, re.MULTILINE)
    }
    for path, number in sorted(expected - reported):
        print(f"{path}:{number}: marked # error, but mypy accepts it")
    for path, number in sorted(reported - expected):
        print(f"{path}:{number}: mypy reports an error on a line not marked # error")
    if not expected or result.returncode not in (0, 1) or reported != expected:
        print(result.stdout, result.stderr, sep="", end="")
        return False
    print(f"  {len(expected)} marked lines refused, no other")
    return True


def main() -> int:
    with tempfile.TemporaryDirectory() as directory:
        passed = user_code(directory)
        passed = cases(directory) and passed
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
