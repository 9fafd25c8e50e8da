"""Type-check code as a user writes it: the examples and the tutorial's program pass
``mypy --strict``, and in tests/typing_cases/ mypy and pyright (basedpyright's build,
which brings its own Node.js from a wheel) each report an error on every line marked
``# error`` and on no other. `make test` runs this
(``python -m tests.typecheck_user_code``).

mypy runs from a temporary directory, not from the repository, so it finds trio_pgs the
way it finds it for a user's program in this venv: through the installed package (an
install that only an import hook can follow fails here), not the working directory.
"""

from __future__ import annotations

import json
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


def pyright(paths: list[Path], directory: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "basedpyright", "--outputjson",
        "--pythonpath", sys.executable, *map(str, paths),
    ]
    return subprocess.run(command, cwd=directory, capture_output=True, text=True)


def mypy_errors(paths: list[Path], directory: str) -> tuple[set[tuple[str, int]], str]:
    result = mypy(paths, directory)
    found = re.findall(r"^(.+?):(\d+): error:", result.stdout, re.MULTILINE)
    if result.returncode not in (0, 1) or (result.returncode == 1 and not found):
        return set(), result.stdout + result.stderr  # mypy itself failed
    return {(path, int(number)) for path, number in found}, result.stdout


def pyright_errors(paths: list[Path], directory: str) -> tuple[set[tuple[str, int]], str]:
    result = pyright(paths, directory)
    try:
        diagnostics = json.loads(result.stdout)["generalDiagnostics"]
    except (ValueError, KeyError):
        return set(), result.stdout + result.stderr  # pyright itself failed
    errors = [item for item in diagnostics if item["severity"] == "error"]
    text = "".join(
        f"{item['file']}:{item['range']['start']['line'] + 1}: {item['message']}\n"
        for item in errors
    )
    return {(item["file"], item["range"]["start"]["line"] + 1) for item in errors}, text


def cases(directory: str) -> bool:
    """The refusals: the lines marked ``# error`` are exactly the lines reported, by
    mypy and by pyright."""
    paths = sorted((ROOT / "tests" / "typing_cases").glob("*.py"))
    expected = {
        (str(path), number)
        for path in paths
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.rstrip().endswith("# error")
    }
    passed = bool(expected)
    for checker, errors in (("mypy --strict", mypy_errors), ("pyright", pyright_errors)):
        print(f"{checker}, errors where marked:", ", ".join(
            str(path.relative_to(ROOT)) for path in paths
        ))
        reported, output = errors(paths, directory)
        for path, number in sorted(expected - reported):
            print(f"{path}:{number}: marked # error, but {checker} accepts it")
        for path, number in sorted(reported - expected):
            print(f"{path}:{number}: {checker} reports an error on a line not marked # error")
        if reported != expected:
            print(output, end="")
            passed = False
        else:
            print(f"  {len(expected)} marked lines refused, no other")
    return passed


def main() -> int:
    with tempfile.TemporaryDirectory() as directory:
        passed = user_code(directory)
        passed = cases(directory) and passed
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
