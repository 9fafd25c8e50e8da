"""The ``trio-pgs`` command line: its parser and ``main``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import __version__
from .._postgres_conn import Secret
from .._ref import check_key
from . import _commands as run
from ._exit import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NOT_STARTED, CommandError
from ._output import err


def _kind(text: str) -> str:
    """A KIND argument names a server's record, never another row of the store (a
    tombstone, the format marker): it is non-empty and holds no unit separator. An
    unprintable kind is accepted, so that a junk row written behind the store can be
    shown and purged."""
    if not text or "\x1f" in text:
        raise argparse.ArgumentTypeError(
            f"a kind must be non-empty and hold no \\x1f, not {text!r}"
        )
    return _utf8(text, "kind")


def _utf8(text: str, what: str) -> str:
    """*text*, if UTF-8 holds it (an argument of bytes that are not UTF-8 comes as
    lone surrogates, which no store can hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"the {what} {text!r} is not UTF-8") from None
    return text


def _key(text: str) -> str:
    try:
        check_key(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return _utf8(text, "key")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its usage errors scrubbed of the secrets of the arguments
    (a store URL given where a command belongs is quoted back)."""

    scrub: Callable[[str], str] = staticmethod(lambda text: text)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_NOT_STARTED, f"{self.prog}: error: {_Parser.scrub(message)}\n")


def _scrubber(argv: Sequence[str]) -> Callable[[str], str]:
    """What takes the secrets of *argv* (any DSN among them) out of a message."""
    secrets = [Secret(arg) for arg in argv if "=" in arg or "://" in arg or "@" in arg]

    def scrub(text: str) -> str:
        for secret in secrets:
            text = secret.scrub(text)
        return text

    return scrub


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trio-pgs",
        description="Inspect and repair the servers stored in a trio-pgs store. STORE is "
        "its directory, or a store URL: diskcache:PATH, diskcache:///absolute/path, "
        "postgresql://... Safe while an application has the store open (see docs/cli.md).",
        epilog="Exit status: 0 done; 1 ran and did not do all that was asked (no such "
        "record, a refusal, a conflict with another writer, a failed read or write, an "
        "incomplete export); 2 could not start, nothing changed (bad usage, a store that "
        "cannot be opened, a bad import file); 130 interrupted. See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"trio-pgs {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str,
                ident: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("store", metavar="STORE",
                         help="the store: its directory, or a URL (diskcache:PATH, "
                         "postgresql://...[?schema=NAME])")
        if ident:
            sub.add_argument("kind", metavar="KIND", type=_kind, help="the server's kind")
            sub.add_argument("key", metavar="KEY", type=_key, help="the server's key")
        sub.set_defaults(run=run)
        return sub

    command("list", run.list_command, "One row per stored server.").add_argument(
        "--kind", type=_kind, help="only the servers of this kind"
    )
    command("show", run.show_command, "Print a server's stored state as JSON (its metadata "
            "on stderr).", ident=True).add_argument(
        "--meta", action="store_true",
        help="print the whole record as JSON on stdout instead (as export writes it)",
    )
    command("stats", run.stats_command, "Records, quarantined servers and bytes, per kind.")
    command("release", run.release_command, "Lift a server's quarantine (and forget its "
            "crashes), like PersistentSupervisor.release.", ident=True)
    command("purge", run.purge_command, "Delete a server's record.", ident=True).add_argument(
        "--yes", "-y", action="store_true", help="do not ask for confirmation"
    )
    command("export", run.export_command, "Write every record as JSON lines.").add_argument(
        "--output", "-o", metavar="FILE", help="write to FILE instead of stdout"
    )
    command("nodes", run.nodes_command, "The nodes of each supervisor open on a PostgreSQL "
            "store: address, host, pid, lease left (s), active servers.").add_argument(
        "--supervisor", metavar="NAME", help="only the nodes of this supervisor name"
    )
    importer = command("import", run.import_command, "Add the records of an export to the "
                       "store (which is created in a new or empty directory).")
    importer.add_argument("file", metavar="FILE", nargs="?",
                          help="the export to read (default: stdin)")
    importer.add_argument("--replace", action="store_true",
                          help="overwrite records that already exist")
    importer.add_argument("--allow-empty", action="store_true",
                          help="accept an export with no records (else refused)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-pgs`` command with *argv* (default: ``sys.argv[1:]``); return
    its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    scrub = _Parser.scrub = _scrubber(argv)
    if sys.stdout is None:  # started with its standard output closed
        err("trio-pgs: the standard output is closed")
        return EXIT_NOT_STARTED
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_NOT_STARTED
    try:
        status: int = args.run(args)
    except CommandError as exc:
        err(f"trio-pgs: {scrub(str(exc))}")
        return exc.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `trio-pgs export DIR | head`: the output is cut short
        # Python would fail again flushing stdout at exit; point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:  # writing the output failed (a full disk, say)
        err(f"trio-pgs: cannot write the output: {scrub(str(exc))}")
        with contextlib.suppress(OSError):  # nor will it at exit: point it at /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return status
