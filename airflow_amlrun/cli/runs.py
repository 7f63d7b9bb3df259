"""`amlrun runs` and `amlrun experiments`: the run history, read."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from airflow_amlrun.cli.common import (
    RUN_STATUSES,
    cell,
    error_console,
    experiment_name,
    fmt,
    get_run,
    line_count,
    positive_count,
    print_json,
    status,
    text,
    workspace,
    write_line,
)

if TYPE_CHECKING:
    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.hyperdrive.recorded import RecordedSweep


def cmd_runs_list(args: argparse.Namespace, console: Console) -> int:
    runs: list[RunRecord] = workspace(args).list_runs(
        experiment=args.experiment, status=args.status, limit=args.limit
    )
    if args.json:
        print_json(console, [r.summary() for r in runs])
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
            fmt(r.duration_seconds),
            cell(", ".join(f"{k}={fmt(v)}" for k, v in r.metrics.items())),
        )
    console.print(table)
    return 0


# Lines of a failed or canceled run's log `runs show` prints, unless --tail says otherwise.
DEFAULT_TAIL = 20


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


def _sweep_rows(record: RunRecord, sweep: RecordedSweep | None) -> list[tuple[str, str]]:
    """What `runs show` says of a sweep's parent run in place of its arguments: it runs nothing itself, each of
    its runs adds the values it draws to the recorded arguments; and how the sweep searched, as recorded."""
    given = " ".join(map(str, record.arguments))
    if sweep is None:
        return [
            ("arguments", f"none of its own: each of its runs gets {given or 'none'} and the values it drew")
        ]
    limits = f"at most {sweep.max_total_runs} runs, {sweep.max_concurrent_runs or 1} at a time"
    if sweep.max_duration_minutes is not None:
        limits += f", for {fmt(sweep.max_duration_minutes)} minutes at most"
    each = " ".join([given, *sweep.drawn_arguments]).strip()
    return [
        (
            "arguments",
            f"none of its own: each of its runs gets {each}, with the values it drew (`amlrun runs show` of the "
            "run shows them)",
        ),
        ("search space", "\n".join(f"{name} {values}" for name, values in sweep.parameter_space.items())),
        ("sampling", sweep.sampling + (f", seed {sweep.seed}" if sweep.seed is not None else "")),
        ("primary metric", f"{sweep.primary_metric_name}, {sweep.primary_metric_goal}"),
        ("early termination", sweep.policy or "none: every run goes on to its end"),
        ("limits", limits),
    ]


def _sweep_git(record: RunRecord, runs: list[RunRecord], sweep: RecordedSweep | None) -> str:
    """What `runs show` says of a sweep's git state: it has none, each of its runs recorded that of its code."""
    from airflow_amlrun.hyperdrive.recorded import runs_to_read, shared_git

    said = (
        "A sweep runs no code of its own, so it has no git state: each of its runs records that of its code"
    )
    shared = sweep.git if sweep is not None else shared_git([run.git for run in runs])
    said += f"; all of them ran {_git_state(shared)}." if shared else "."
    return f"{said} {runs_to_read(record, runs, 'amlrun runs show', 'shows')}"


def cmd_runs_show(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun.hyperdrive.recorded import RecordedSweep
    from airflow_amlrun.run_log import LogUnavailableError, RunLog, sweep_logs
    from airflow_amlrun.runconfig import SWEEP_TARGET

    ws = workspace(args)
    record = get_run(ws, args.run_id)
    run_log = RunLog(ws, record.id)
    # A sweep's parent run runs no code: it has no log to tail, and says where its runs' logs are.
    is_sweep = record.target == SWEEP_TARGET
    failed = record.status.is_terminal and str(record.status) != "Completed" and not is_sweep
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
    # A sweep's runs, oldest first: where its log and git state are (none for any other run).
    runs = ws.history.child_runs(record.id) if is_sweep else []
    sweep = RecordedSweep.of(record, [run.git for run in runs])
    if args.json:
        # As GET /api/runs/{id} gives it: how a sweep searched, null for any other run.
        shown = {
            "arguments": record.arguments,
            "tags": record.tags,
            "log": location,
            "log_tail": tail,
            "sweep": vars(sweep) if sweep else None,
        }
        console.print_json(json.dumps({**record.summary(), **shown}))
        return 0
    table = Table(title=f"Run {record.id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    # What the script can set (its tags, its metrics' names, its error's text) is shown as its log is.
    for_terminal = run_log.shown
    for key, value in record.summary().items():
        if key == "git":
            git = _sweep_git(record, runs, sweep) if is_sweep else _git_state(record.git)
            table.add_row("git", cell(git, for_terminal))
        elif key not in ("metrics", "tags"):  # shown below, each in a form of its own
            text = json.dumps(value) if isinstance(value, dict | list) else fmt(value)
            table.add_row(key, cell(text, for_terminal))
    if is_sweep:
        for field, value in _sweep_rows(record, sweep):
            table.add_row(field, cell(value, for_terminal))
    else:
        table.add_row("arguments", cell(" ".join(record.arguments), for_terminal))
    tags = ", ".join(f"{k}={v}" for k, v in sorted(record.tags.items()))
    table.add_row("tags", cell(tags or "none", for_terminal))
    if record.dag_id is not None:
        task = f"{record.dag_id}.{record.task_id} {record.airflow_run_id or ''}".strip()
        table.add_row("airflow task", task + (f", try {record.try_number}" if record.try_number else ""))
    else:
        table.add_row("airflow task", "none: submitted outside Airflow")
    if is_sweep:
        table.add_row("log", cell(sweep_logs(record, runs), for_terminal))
    elif location is not None:
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
        metrics.add_row(cell(point.name, for_terminal), fmt(point.step), fmt(point.value))
    console.print(metrics)
    if tail:
        console.print(f"Last {len(tail)} lines of its log:", style="bold", highlight=False)
        for line in tail:
            console.out(line, highlight=False)
    elif tail_problem:
        console.print(escape(tail_problem), highlight=False)
    return 0


# Exit status of `runs logs --follow` when it stops following a run nobody reports on any more (0: the run
# Completed, 1: it ended otherwise, 2: an error, 130: interrupted).
UNATTENDED = 3


def cmd_runs_logs(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun.config import load_settings
    from airflow_amlrun.run_log import LogPosition, RunLog, silent_seconds

    ws = workspace(args)
    record = get_run(ws, args.run_id)
    settings = load_settings()
    run_log = RunLog(ws, record.id, settings)
    poll = min(max(settings.poll_interval_seconds, 0.2), 2.0)
    err = error_console()
    position = LogPosition()
    grew = time.monotonic()
    pending = 0
    try:
        while True:
            read = run_log.read(position)
            for line in read.lines:
                write_line(run_log.shown(line))
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


def cmd_experiments(args: argparse.Namespace, console: Console) -> int:
    experiments = workspace(args).list_experiments()
    if args.json:
        print_json(
            console,
            [{"name": e.name, "runs": e.run_count, "created": e.created_at.isoformat()} for e in experiments],
        )
        return 0
    table = Table(title="Experiments")
    table.add_column("name")
    table.add_column("runs", justify="right")
    table.add_column("created")
    for e in experiments:
        table.add_row(e.name, str(e.run_count), e.created_at.isoformat(timespec="seconds"))
    console.print(table)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `runs list|show|logs` and `experiments`."""
    runs = sub.add_parser("runs", help="list or show runs").add_subparsers(dest="runs_command", required=True)
    listing = runs.add_parser("list", help="runs, newest first")
    listing.add_argument("--experiment", type=experiment_name)
    listing.add_argument(
        "--status",
        type=status,
        metavar="STATUS",
        help=f"runs of this status, in any case: {', '.join(RUN_STATUSES)}",
    )
    listing.add_argument("--limit", type=positive_count, default=20)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_runs_list)
    show = runs.add_parser(
        "show",
        help="one run: its metrics, tags, git state, log location and, if it failed, its log's last lines",
    )
    show.add_argument("run_id", type=text("run id"))
    show.add_argument(
        "--tail",
        type=line_count,
        default=None,
        metavar="N",
        help=f"print the last N lines of its log (default: {DEFAULT_TAIL} for a failed or canceled run, else 0)",
    )
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_runs_show)
    logs = runs.add_parser("logs", help="a run's log (its script's stdout and stderr)")
    logs.add_argument("run_id", type=text("run id"))
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

    experiments = sub.add_parser("experiments", help="experiments and their run counts")
    experiments.add_argument("--json", action="store_true")
    experiments.set_defaults(func=cmd_experiments)
