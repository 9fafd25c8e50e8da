"""Start or stop the one throwaway PostgreSQL server that CI hands to every test session.

    python .ci/postgres.py start DIRECTORY   # prints the server's DSN
    python .ci/postgres.py stop DIRECTORY

The server (pgserver: PostgreSQL binaries in a wheel) keeps running after `start`
returns, until `stop`.
"""

import sys
import warnings

warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set

import pgserver  # noqa: E402


def main(command: str, directory: str) -> None:
    if command == "start":
        server = pgserver.get_server(directory, cleanup_mode=None)
        print(server.get_uri())
    elif command == "stop":
        pgserver.get_server(directory, cleanup_mode="stop").cleanup()
    else:
        raise SystemExit(f"unknown command {command!r}: start or stop")


if __name__ == "__main__":
    main(*sys.argv[1:])
