"""`amlrun`: the run history, runs, sweeps, models and environments of a workspace, from a terminal.

One module per command group; each adds its commands to the parser (``register``), and each command is a
function of the parsed arguments and the console that returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import select
import sys
import traceback
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from airflow_amlrun.cli import envs, models, reconcile, runs, snapshot, submit, sweep
from airflow_amlrun.cli.common import RUN_STATUSES, connection_id, error_line, line_count, status
from airflow_amlrun.config import parse_flag
from airflow_amlrun.errors import AmlRunError, ConfigurationError

# The names the command line's checks had before it became a package.
_line_count, _status = line_count, status

__all__ = ["RUN_STATUSES", "build_parser", "main"]

# Set to 1 (true, yes, on), amlrun prints the traceback of an error before its one line.
DEBUG_ENV = "AMLRUN_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amlrun",
        description="Submit runs and sweeps, and read the run history, models and environments of an "
        "airflow-amlrun workspace.",
    )
    parser.add_argument(
        "--conn-id",
        type=connection_id,
        default=None,
        help="amlrun connection of the workspace (default: the default one)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (runs, submit, sweep, models, envs, reconcile, snapshot):
        group.register(sub)
    return parser


def _show_workspace_notes() -> None:
    """What the workspace says once (e.g. that it made the embedded workspace's folder) goes to stderr."""
    notes = logging.getLogger("airflow_amlrun.workspace")
    if not notes.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        notes.addHandler(handler)
        notes.setLevel(logging.INFO)
        notes.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_workspace_notes()
    # Sentences are never broken across lines (a path in one stays whole for grep); tables fit the width.
    console = Console(width=200 if not sys.stdout.isatty() else None, soft_wrap=True)
    # What a user can meet is said in a line, exit status 2; anything else is a fault of this program, and its
    # traceback is what to report.
    try:
        result: int = args.func(args, console)
    except AmlRunError as err:
        return _failed(str(err), err)
    except BrokenPipeError as err:
        if not _stdout_closed():
            # A pipe of something else (a supervisor, a socket) broke: an error like any other.
            return _failed(os_error_message(err, _command(args)), err)
        # Whoever read the output stopped reading (`amlrun runs list | head`): nothing is left to say there.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        return _failed(os_error_message(err, _command(args)), err)
    except KeyboardInterrupt as err:
        # A command may say what the interruption left behind (`amlrun sweep`: the sweep it recorded Canceled).
        _failed(f"interrupted (Ctrl-C): {err}" if str(err) else "interrupted (Ctrl-C)")
        return 130
    except Exception as err:
        database = _history_database(args)
        message = history_away_message(err, database) or history_refused_message(err, database)
        if message is None:
            raise
        return _failed(message, err)
    return result


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _failed(message: str, err: BaseException | None = None) -> int:
    """Say `message` in a line on stderr; with ``AMLRUN_DEBUG=1``, the traceback of `err` first (to report what
    looks like a fault of this program, e.g. a statement the database refused that no hand changed)."""
    stderr = Console(stderr=True, soft_wrap=True)
    if err is not None and _debugging():
        stderr.print("".join(traceback.format_exception(err)), end="", highlight=False, markup=False)
    stderr.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return 2


def _debugging() -> bool:
    value = os.environ.get(DEBUG_ENV, "")
    try:
        return value != "" and parse_flag(value, DEBUG_ENV)
    except ConfigurationError:
        return False


def _command(args: argparse.Namespace) -> str:
    """The command that was running, as typed: ``amlrun runs logs`` (its words, not its values)."""
    words = ["amlrun", args.command]
    sub = getattr(args, f"{args.command}_command", None)
    return " ".join([*words, sub] if sub else words)


def os_error_message(err: OSError, command: str) -> str:
    """An error of the operating system (a missing file, a permission, a full disk) as a line that names the
    path it concerns, where it says one, else the command that met it (a full disk under its redirected
    output, a connection reset: the error itself names nothing)."""
    reason = err.strerror or str(err) or type(err).__name__
    names = [
        name.decode(errors="replace") if isinstance(name, bytes) else name
        for name in (err.filename, err.filename2)
        if name is not None
    ]
    if not names:
        return f"{command} failed: {reason} ({type(err).__name__})"
    return f"{reason}: {' -> '.join(map(repr, names))}"


def history_away_message(err: Exception, database: str | None) -> str | None:
    """What to say of a run history that could not be reached (its database down, its host unknown); None for
    any other error.

    :param database: the database's URL as messages show it (its password masked), if known.
    """
    if "sqlalchemy" not in sys.modules:
        return None  # no database was asked
    from airflow_amlrun.history.bookkeeping import is_transient

    if not is_transient(err):
        return None
    reason = error_line(err)
    where = f"the run history's database {database}" if database else "the run history's database"
    return (
        f"{where} is not available ({reason}). Check that it runs and that the workspace's connection names it "
        "(--conn-id picks another workspace), then try again."
    )


def history_refused_message(err: Exception, database: str | None) -> str | None:
    """What to say of a statement the run history's database answered and refused (a constraint, a schema changed
    by hand); None for any other error. Call it for an error `history_away_message` has no words for.

    :param database: the database's URL as messages show it (its password masked), if known.
    """
    if "sqlalchemy" not in sys.modules:
        return None  # no database was asked
    from sqlalchemy.exc import DBAPIError

    if not isinstance(err, DBAPIError):
        return None  # raised before the database was asked: a fault of this program
    where = f"the run history's database {database}" if database else "the run history's database"
    return (
        f"{where} refused {_refused_statement(err.statement)}: {error_line(err)} ({type(err).__name__}). The "
        "database is up and answered, so trying again gets the same answer. A schema changed by hand (a table, "
        "column, index, constraint or trigger) is the usual cause: airflow-amlrun needs the schema its migrations "
        "made."
    )


# What a statement asks, by its first words: its verb and the table it names.
_STATEMENTS = (
    (re.compile(r"INSERT\s+INTO\s+([\w.\"]+)", re.I), "an INSERT into {}"),
    (re.compile(r"UPDATE\s+([\w.\"]+)", re.I), "an UPDATE of {}"),
    (re.compile(r"DELETE\s+FROM\s+([\w.\"]+)", re.I), "a DELETE from {}"),
    (re.compile(r"SELECT\b.*?\bFROM\s+([\w.\"]+)", re.I | re.S), "a SELECT from {}"),
    (re.compile(r"ALTER\s+TABLE\s+([\w.\"]+)", re.I), "an ALTER TABLE of {}"),
    (
        re.compile(r"CREATE\s+(?:UNIQUE\s+)?(TABLE|INDEX)\s+(?:IF\s+NOT\s+EXISTS\s+)?([\w.\"]+)", re.I),
        "a CREATE {} {}",
    ),
)


def _refused_statement(statement: str | None) -> str:
    """A statement in brief, for a message: ``an INSERT into amlrun_runs``, ``a SELECT from amlrun_runs``."""
    text = (statement or "").strip()
    for pattern, phrase in _STATEMENTS:
        found = pattern.match(text)
        if found:
            return phrase.format(*(name.strip('"') for name in found.groups()))
    verb = text.split(maxsplit=1)[0].upper() if text else ""
    return f"a {verb} statement" if verb.isalpha() else "a statement"


def _history_database(args: argparse.Namespace) -> str | None:
    """The URL of the command's run history as messages show it (its password masked); None if unknown."""
    from airflow_amlrun.cli.common import workspace
    from airflow_amlrun.history.database import display_url

    try:
        # The workspace the command opened, as it is kept for the process.
        return display_url(workspace(args).database_url)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
