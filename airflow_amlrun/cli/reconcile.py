"""`amlrun reconcile`: settle the runs no task follows any more."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from airflow_amlrun.cli.common import print_json, seconds, workspace
from airflow_amlrun.errors import ConfigurationError


def cmd_reconcile(args: argparse.Namespace, console: Console) -> int:
    from dataclasses import replace

    from airflow_amlrun.config import load_settings
    from airflow_amlrun.heartbeat import heartbeat_seconds
    from airflow_amlrun.reconcile import reconcile

    settings = load_settings()
    if args.after is not None:
        floor = 2 * heartbeat_seconds(settings)
        if args.after < floor:
            raise ConfigurationError(
                f"--after {args.after:g} is shorter than two heartbeats of the tasks following runs ({floor:g} s): "
                "a run a live task follows would look orphaned. Give at least that, or leave it out to use "
                f"[amlrun] reconcile_after_seconds ({settings.reconcile_after_seconds:g} s)."
            )
        settings = replace(settings, reconcile_after_seconds=args.after)
    settlements = reconcile(
        workspace(args),
        settings=settings,
        dry_run=args.dry_run,
        abandon_unreachable=args.abandon_unreachable,
    )
    if args.json:
        print_json(console, [s.__dict__ for s in settlements])
        return 0
    if not settlements:
        console.print(
            f"Nothing to settle: every unfinished run was reported on in the last "
            f"{settings.reconcile_after_seconds:g} s by the task following it."
        )
        return 0
    verb = "would record" if args.dry_run else "recorded"
    table = Table(title="Runs no task followed any more" + (" (dry run)" if args.dry_run else ""))
    for column in ("run id", "experiment", verb, "why"):
        table.add_column(column, overflow="fold")
    for s in settlements:
        table.add_row(s.run_id, s.experiment, s.outcome, s.reason)
    console.print(table)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `reconcile`."""
    settle = sub.add_parser(
        "reconcile",
        help="settle unfinished runs no task follows any more (their worker died and no retry came)",
    )
    settle.add_argument(
        "--after",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="consider runs nobody reported on for this long (default: [amlrun] reconcile_after_seconds)",
    )
    settle.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    settle.add_argument(
        "--abandon-unreachable",
        action="store_true",
        help="record Failed the runs this machine cannot reach (local runs of a worker that is gone)",
    )
    settle.add_argument("--json", action="store_true")
    settle.set_defaults(func=cmd_reconcile)
