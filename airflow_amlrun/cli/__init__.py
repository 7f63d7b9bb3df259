"""`amlrun`: the run history, runs, sweeps, models and environments of a workspace, from a terminal.

One module per command group; each adds its commands to the parser (``register``), and each command is a
function of the parsed arguments and the console that returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from airflow_amlrun.cli import envs, models, reconcile, runs, snapshot, submit, sweep
from airflow_amlrun.cli.common import RUN_STATUSES, connection_id, line_count, status
from airflow_amlrun.errors import AmlRunError

# The names the command line's checks had before it became a package.
_line_count, _status = line_count, status

__all__ = ["RUN_STATUSES", "build_parser", "main"]


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
    console = Console(width=200 if not sys.stdout.isatty() else None)
    try:
        result: int = args.func(args, console)
    except AmlRunError as err:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
