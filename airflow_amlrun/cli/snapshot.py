"""`amlrun snapshot`: a run's code, as its snapshot holds it."""

from __future__ import annotations

import argparse

from rich.console import Console

from airflow_amlrun.cli.common import folder, text, workspace


def cmd_snapshot_restore(args: argparse.Namespace, console: Console) -> int:
    snapshot = workspace(args).restore_snapshot(args.id, args.path)
    console.print(
        f"Restored snapshot {snapshot.id} ({snapshot.file_count} files, {snapshot.total_bytes} bytes) to {args.path}"
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `snapshot restore`."""
    snapshot = sub.add_parser("snapshot", help="code snapshots").add_subparsers(
        dest="snapshot_command", required=True
    )
    restore = snapshot.add_parser(
        "restore", help="write a run's code (or a snapshot) into an empty folder, verified"
    )
    restore.add_argument("id", type=text("run or snapshot id"), help="run id or snapshot id")
    restore.add_argument("path", type=folder, help="destination folder (empty or new)")
    restore.set_defaults(func=cmd_snapshot_restore)
