"""What the `amlrun` commands share: the workspace they open, how they show values, and the checks of the
values of the command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from airflow_amlrun.errors import ConfigurationError, shown

if TYPE_CHECKING:
    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.workspace import Workspace


def workspace(args: argparse.Namespace) -> Workspace:
    from airflow_amlrun.workspace import Workspace

    return Workspace.get(args.conn_id)


def cell(text: str, show: Callable[[str], str] | None = None) -> Text:
    """A table cell holding text a script may have set (a tag, a metric's name): as `show` gives it (default:
    `run_log.printable`), and never read as markup (which could make a link)."""
    if show is None:
        from airflow_amlrun.run_log import printable

        show = printable
    return Text(show(text))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def print_json(console: Console, value: Any) -> None:
    """JSON of a listing, for scripts: every `--json` prints through here."""
    console.print_json(json.dumps(value, default=str))


def write_line(line: str) -> None:
    # The script's own text: not markup, not wrapped, each line out as it comes.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def error_line(err: BaseException) -> str:
    """An error's words on one line: a database driver's error (kept as ``orig`` by SQLAlchemy) without the
    statement and link SQLAlchemy adds on lines of their own, other errors' lines joined."""
    return " ".join(str(getattr(err, "orig", None) or err).split())


def error_console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


# Values of the command line, checked as argparse reads them: a bad one ends with usage and a message that
# names the option (`argument --limit: ...`), before any workspace is opened (or the history's database
# library imported: a mistyped option fails in a moment).


def connection_id(value: str) -> str:
    from airflow_amlrun.workspace import CONNECTION_ID, CONNECTION_ID_RULE

    if not CONNECTION_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{shown(value)} is not an Airflow connection id ({CONNECTION_ID_RULE}); leave --conn-id out for "
            "the default workspace"
        )
    return value


def positive_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{shown(value)} is not a positive whole number, e.g. --limit 50")
    return count


def line_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(
            f"{shown(value)} is not a number of lines, e.g. --tail 50 (--tail 0 shows none)"
        )
    return count


# The values of RunStatus, named here so that `--help` lists them without importing the history (and its
# database library); a unit test keeps the two alike.
RUN_STATUSES = ("Queued", "Preparing", "Starting", "Running", "Finalizing", "Completed", "Failed", "Canceled")


def status(value: str) -> str:
    for status in RUN_STATUSES:
        if value.strip().lower() == status.lower():
            return status
    raise argparse.ArgumentTypeError(
        f"{shown(value)} is not a run status; use one of {', '.join(RUN_STATUSES)}"
    )


def experiment_name(value: str) -> str:
    from airflow_amlrun.experiment import check_experiment_name

    try:
        return check_experiment_name(value)
    except ConfigurationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"{shown(value)} is not a positive number of seconds, e.g. --after 900"
        )
    return seconds


def text(what: str) -> Any:
    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"the {what} is empty; `amlrun runs list` shows the run ids")
        return value

    return check


def folder(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the destination folder is empty; name a new or empty folder")
    return value


def get_run(ws: Workspace, run_id: str) -> RunRecord:
    from airflow_amlrun.history import RunNotFoundError

    try:
        record: RunRecord = ws.get_run(run_id)
    except RunNotFoundError as err:
        raise RunNotFoundError(f"{err} `amlrun runs list` shows the runs there.") from None
    return record
