"""The matrix: tests on every supported Python, lint, typecheck, benchmarks."""

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "trio_pgs", "tests", "examples", "benchmarks")
    session.install("-e", ".", "import-linter")
    session.run("lint-imports")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "trio_pgs")
    session.run("python", "-m", "tests.typecheck_user_code")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark section, each figure beside baselines of the same run.

    `nox -s bench -- --only activation`, `-- --scale full`, `-- --markdown PATH`: see
    `python benchmarks/run.py --help`.
    """
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def race(session: nox.Session) -> None:
    """The long race run: 5,000 random programs (RACE_EXAMPLES), seed printed first.

    `nox -s race -- SEED` replays a run; `nox -s race -- SEED N` also sets the count.
    """
    import random

    seed = session.posargs[0] if session.posargs else str(random.randrange(2**32))
    examples = session.posargs[1] if len(session.posargs) > 1 else "5000"
    session.install("-e", ".[dev]")
    session.log(f"race seed: {seed} (replay: nox -s race -- {seed} {examples})")
    session.run(
        "pytest", "tests/test_races.py", "-q", f"--hypothesis-seed={seed}",
        "--hypothesis-show-statistics", "-p", "no:cacheprovider",
        env={"RACE_EXAMPLES": examples},
    )


@nox.session
def cluster(session: nox.Session) -> None:
    """The cluster's process tests with more kill and pause rounds (CLUSTER_ROUNDS,
    default 40; the suite does 10). Needs a PostgreSQL: pgserver on Python 3.10 to
    3.12, or TRIO_PGS_POSTGRES_DSN."""
    rounds = session.posargs[0] if session.posargs else "40"
    session.install("-e", ".[dev]")
    session.run(
        "pytest", "tests/test_cluster.py", "-q", "-p", "no:cacheprovider",
        env={"TRIO_PGS_CLUSTER_ROUNDS": rounds},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, warnings as errors, in docs/_build/html."""
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
