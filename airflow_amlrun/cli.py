"""`amlrun`: read the run history from a terminal."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from airflow_amlrun.errors import AmlRunError, ConfigurationError, shown

if TYPE_CHECKING:
    from airflow_amlrun.history import RunRecord


def _workspace(args: argparse.Namespace) -> Any:
    from airflow_amlrun.workspace import Workspace

    return Workspace.get(args.conn_id)


def _cell(text: str, show: Callable[[str], str] | None = None) -> Text:
    """A table cell holding text a script may have set (a tag, a metric's name): as `show` gives it (default:
    `run_log.printable`), and never read as markup (which could make a link)."""
    if show is None:
        from airflow_amlrun.run_log import printable

        show = printable
    return Text(show(text))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def cmd_runs_list(args: argparse.Namespace, console: Console) -> int:
    runs: list[RunRecord] = _workspace(args).list_runs(
        experiment=args.experiment, status=args.status, limit=args.limit
    )
    if args.json:
        console.print_json(json.dumps([r.summary() for r in runs]))
        return 0
    table = Table(title="Runs", show_lines=False)
    for column in ("run id", "experiment", "status", "target", "start", "duration s", "metrics"):
        table.add_column(column, overflow="fold")
    for r in runs:
        table.add_row(
            r.id,
            r.experiment,
            str(r.status),
            r.target,
            r.start.isoformat(timespec="seconds") if r.start else "",
            _fmt(r.duration_seconds),
            _cell(", ".join(f"{k}={_fmt(v)}" for k, v in r.metrics.items())),
        )
    console.print(table)
    return 0


# Values of the command line, checked as argparse reads them: a bad one ends with usage and a message that
# names the option (`argument --limit: ...`), before any workspace is opened (or the history's database
# library imported: a mistyped option fails in a moment).


def _connection_id(value: str) -> str:
    from airflow_amlrun.workspace import CONNECTION_ID, CONNECTION_ID_RULE

    if not CONNECTION_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{shown(value)} is not an Airflow connection id ({CONNECTION_ID_RULE}); leave --conn-id out for "
            "the default workspace"
        )
    return value


def _positive_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{shown(value)} is not a positive whole number, e.g. --limit 50")
    return count


def _line_count(value: str) -> int:
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


def _status(value: str) -> str:
    for status in RUN_STATUSES:
        if value.strip().lower() == status.lower():
            return status
    raise argparse.ArgumentTypeError(
        f"{shown(value)} is not a run status; use one of {', '.join(RUN_STATUSES)}"
    )


def _experiment(value: str) -> str:
    from airflow_amlrun.experiment import check_experiment_name

    try:
        return check_experiment_name(value)
    except ConfigurationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"{shown(value)} is not a positive number of seconds, e.g. --after 900"
        )
    return seconds


def _text(what: str) -> Any:
    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"the {what} is empty; `amlrun runs list` shows the run ids")
        return value

    return check


def _folder(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the destination folder is empty; name a new or empty folder")
    return value


# Lines of a failed or canceled run's log `runs show` prints, unless --tail says otherwise.
DEFAULT_TAIL = 20


def _get_run(ws: Any, run_id: str) -> RunRecord:
    from airflow_amlrun.history import RunNotFoundError

    try:
        record: RunRecord = ws.get_run(run_id)
    except RunNotFoundError as err:
        raise RunNotFoundError(f"{err} `amlrun runs list` shows the runs there.") from None
    return record


def _git_state(git: dict[str, Any] | None) -> str:
    if not git:
        return "not a git checkout"
    commit = git.get("commit") or "no commit"
    state = f"{commit} on {git['branch']}" if git.get("branch") else f"{commit} (detached)"
    if git.get("dirty"):
        diff = git.get("diff_digest")
        state += f", dirty: uncommitted changes, diff stored as blob {diff}" if diff else ", dirty"
    elif git.get("dirty") is False:
        state += ", clean"
    if git.get("repository_uri"):
        state += f", {git['repository_uri']}"
    return state


def cmd_runs_show(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun.run_log import LogUnavailableError, RunLog

    ws = _workspace(args)
    record = _get_run(ws, args.run_id)
    run_log = RunLog(ws, record.id)
    failed = record.status.is_terminal and str(record.status) != "Completed"
    lines = args.tail if args.tail is not None else (DEFAULT_TAIL if failed else 0)
    tail: list[str] = []
    tail_problem = None
    if lines and record.status.is_terminal:
        try:
            tail = [run_log.shown(line) for line in run_log.tail(record, lines)]
        except LogUnavailableError as err:
            tail_problem = str(err)
    elif lines:
        tail_problem = (
            f"Run {record.id} is {record.status}: `amlrun runs logs {record.id} --follow` follows its log."
        )
    location = run_log.location(record)
    if args.json:
        console.print_json(
            json.dumps({**record.summary(), "tags": record.tags, "log": location, "log_tail": tail})
        )
        return 0
    table = Table(title=f"Run {record.id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    # What the script can set (its tags, its metrics' names, its error's text) is shown as its log is.
    for_terminal = run_log.shown
    for key, value in record.summary().items():
        if key == "git":
            table.add_row("git", _cell(_git_state(record.git), for_terminal))
        elif key != "metrics":
            text = json.dumps(value) if isinstance(value, dict | list) else _fmt(value)
            table.add_row(key, _cell(text, for_terminal))
    table.add_row("arguments", _cell(" ".join(record.arguments), for_terminal))
    tags = ", ".join(f"{k}={v}" for k, v in sorted(record.tags.items()))
    table.add_row("tags", _cell(tags or "none", for_terminal))
    if record.dag_id is not None:
        task = f"{record.dag_id}.{record.task_id} {record.airflow_run_id or ''}".strip()
        table.add_row("airflow task", task + (f", try {record.try_number}" if record.try_number else ""))
    else:
        table.add_row("airflow task", "none: submitted outside Airflow")
    if location is not None:
        table.add_row("log", f"{location}  (`amlrun runs logs {record.id}` prints it)")
    elif record.status.is_terminal:
        table.add_row("log", "none stored: nothing was collected from its target")
    else:
        table.add_row("log", f"on its target while it runs: `amlrun runs logs {record.id} --follow`")
    console.print(table, highlight=False)
    metrics = Table(title="Metrics")
    for column in ("name", "step", "value"):
        metrics.add_column(column)
    for point in ws.history.get_metrics(record.id):
        metrics.add_row(_cell(point.name, for_terminal), _fmt(point.step), _fmt(point.value))
    console.print(metrics)
    if tail:
        console.print(f"Last {len(tail)} lines of its log:", style="bold", highlight=False)
        for line in tail:
            console.out(line, highlight=False)
    elif tail_problem:
        console.print(escape(tail_problem), highlight=False)
    return 0


def _write(line: str) -> None:
    # The script's own text: not markup, not wrapped, each line out as it comes.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# Exit status of `runs logs --follow` when it stops following a run nobody reports on any more (0: the run
# Completed, 1: it ended otherwise, 2: an error, 130: interrupted).
UNATTENDED = 3


def cmd_runs_logs(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun.config import load_settings
    from airflow_amlrun.run_log import LogPosition, RunLog, silent_seconds

    ws = _workspace(args)
    record = _get_run(ws, args.run_id)
    settings = load_settings()
    run_log = RunLog(ws, record.id, settings)
    poll = min(max(settings.poll_interval_seconds, 0.2), 2.0)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    position = LogPosition()
    grew = time.monotonic()
    pending = 0
    try:
        while True:
            read = run_log.read(position)
            for line in read.lines:
                _write(run_log.shown(line))
            position = read.position
            record = read.record
            if read.ended:
                break
            if record.status.is_terminal:
                continue  # the rest of its stored log
            if not args.follow:
                err.print(
                    f"Run {record.id} is {record.status}: this is its log so far; "
                    f"`amlrun runs logs {record.id} --follow` follows it to its end."
                )
                return 0
            if read.lines or read.pending != pending:
                grew = time.monotonic()
                pending = read.pending
                if read.lines:
                    continue
            # A run whose task died stays unfinished until `amlrun reconcile` settles it: following it would
            # never end. Its log may still grow (the script runs on), so both must have stopped.
            threshold = settings.reconcile_after_seconds
            silent = silent_seconds(record)
            if silent > threshold and time.monotonic() - grew > threshold:
                err.print(
                    f"Run {record.id} is {record.status}, but the task following it has not reported on it for "
                    f"{silent:.0f} s and its log has not grown for {time.monotonic() - grew:.0f} s: that task "
                    f"died, or cannot reach the history. `amlrun reconcile` settles it (after "
                    f"[amlrun] reconcile_after_seconds = {threshold:g} s without news of it)."
                )
                return UNATTENDED
            time.sleep(poll)
    except KeyboardInterrupt:
        err.print(f"Stopped following run {record.id}; the run goes on.")
        return 130
    if not args.follow:
        return 0
    outcome = f"Run {record.id} {record.status}"
    err.print(f"{outcome}: {escape(run_log.shown(record.error))}" if record.error else f"{outcome}.")
    return 0 if str(record.status) == "Completed" else 1


def cmd_rerun(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun.run import rerun
    from airflow_amlrun.run_log import RunLog

    ws = _workspace(args)
    secrets = {}
    for name in args.secret:
        if name not in os.environ:
            raise ConfigurationError(f"--secret {name}: the variable {name} is not set in this environment.")
        secrets[name] = os.environ[name]
    run = rerun(ws, args.run_id, compute_target=args.target, secret_environment_variables=secrets)
    console.print(f"Run {run.id} re-runs {args.run_id}; its output follows.", highlight=False)
    shown = RunLog(ws, run.id).shown

    def masked(line: str) -> str:
        # The run's secret values never reach the terminal, as they never reach a task log.
        for value in secrets.values():
            if value:
                line = line.replace(value, "***")
        return shown(line)

    record = run.wait_for_completion(raise_on_error=False, output=lambda line: _write(masked(line)))
    console.print(f"Run {record.id}: {record.status}", highlight=False)
    if args.json:
        console.print_json(json.dumps(record.summary()))
    return 0 if str(record.status) == "Completed" else 1


def cmd_experiments(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="Experiments")
    table.add_column("name")
    table.add_column("runs", justify="right")
    table.add_column("created")
    for e in _workspace(args).list_experiments():
        table.add_row(e.name, str(e.run_count), e.created_at.isoformat(timespec="seconds"))
    console.print(table)
    return 0


def cmd_snapshot_restore(args: argparse.Namespace, console: Console) -> int:
    snapshot = _workspace(args).restore_snapshot(args.id, args.path)
    console.print(
        f"Restored snapshot {snapshot.id} ({snapshot.file_count} files, {snapshot.total_bytes} bytes) to {args.path}"
    )
    return 0


def cmd_reconcile(args: argparse.Namespace, console: Console) -> int:
    from dataclasses import replace

    from airflow_amlrun.config import load_settings
    from airflow_amlrun.reconcile import reconcile
    from airflow_amlrun.run import heartbeat_seconds

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
        _workspace(args),
        settings=settings,
        dry_run=args.dry_run,
        abandon_unreachable=args.abandon_unreachable,
    )
    if args.json:
        console.print_json(json.dumps([s.__dict__ for s in settlements]))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amlrun", description="Read the airflow-amlrun run history.")
    parser.add_argument(
        "--conn-id",
        type=_connection_id,
        default=None,
        help="amlrun connection of the workspace (default: the default one)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    runs = sub.add_parser("runs", help="list or show runs").add_subparsers(dest="runs_command", required=True)
    listing = runs.add_parser("list", help="runs, newest first")
    listing.add_argument("--experiment", type=_experiment)
    listing.add_argument(
        "--status",
        type=_status,
        metavar="STATUS",
        help=f"runs of this status, in any case: {', '.join(RUN_STATUSES)}",
    )
    listing.add_argument("--limit", type=_positive_count, default=20)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_runs_list)
    show = runs.add_parser(
        "show",
        help="one run: its metrics, tags, git state, log location and, if it failed, its log's last lines",
    )
    show.add_argument("run_id", type=_text("run id"))
    show.add_argument(
        "--tail",
        type=_line_count,
        default=None,
        metavar="N",
        help=f"print the last N lines of its log (default: {DEFAULT_TAIL} for a failed or canceled run, else 0)",
    )
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_runs_show)
    logs = runs.add_parser("logs", help="a run's log (its script's stdout and stderr)")
    logs.add_argument("run_id", type=_text("run id"))
    logs.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help=(
            "follow a running run's log until it ends; exit 0 if it Completed, 1 otherwise, "
            f"{UNATTENDED} if its task stopped reporting on it (see `amlrun reconcile`)"
        ),
    )
    logs.set_defaults(func=cmd_runs_logs)

    sub.add_parser("experiments", help="experiments and their run counts").set_defaults(func=cmd_experiments)

    again = sub.add_parser(
        "rerun",
        help="run a recorded run again (its code, environment version, arguments and config) as a new run, "
        "and follow it; exit 0 if it Completed, 1 otherwise",
    )
    again.add_argument("run_id", type=_text("run id"))
    again.add_argument(
        "--target",
        type=_text("compute target"),
        default=None,
        help="compute target to run it on: 'local', 'docker' or a connection id (default: its own)",
    )
    again.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME",
        help="a secret environment variable of the run, whose value is never recorded: taken from the variable "
        "NAME of this environment (repeat for each)",
    )
    again.add_argument("--json", action="store_true", help="print the new run's summary as JSON at the end")
    again.set_defaults(func=cmd_rerun)

    settle = sub.add_parser(
        "reconcile",
        help="settle unfinished runs no task follows any more (their worker died and no retry came)",
    )
    settle.add_argument(
        "--after",
        type=_seconds,
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

    snapshot = sub.add_parser("snapshot", help="code snapshots").add_subparsers(
        dest="snapshot_command", required=True
    )
    restore = snapshot.add_parser(
        "restore", help="write a run's code (or a snapshot) into an empty folder, verified"
    )
    restore.add_argument("id", type=_text("run or snapshot id"), help="run id or snapshot id")
    restore.add_argument("path", type=_folder, help="destination folder (empty or new)")
    restore.set_defaults(func=cmd_snapshot_restore)
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
