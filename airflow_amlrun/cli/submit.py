"""`amlrun submit` and `amlrun rerun`: start a run from a YAML file, or again from its record, and follow it.

The file of `amlrun submit` holds the ScriptRunConfig's fields (as ``ScriptRunConfig.from_yaml`` reads them)
and what the command line adds to a run::

    experiment: churn                 # or --experiment
    tags: {team: forecasting}
    display_name: churn, weekly
    description: the baseline
    source_directory: src             # relative paths start at this file's folder
    script: train.py
    arguments: [--alpha, 0.5]
    compute_target: local             # or --target
    environment: amlrun-sklearn:1     # a registered or curated one: name, name:version or name@label
    # environment_file: env.yaml      # or an Environment YAML file (Environment.load), or inline:
    # environment: {name: churn, python: {pip_requirements: [pandas>=2]}}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from airflow_amlrun.cli.bars import ProgressBars
from airflow_amlrun.cli.common import error_line, experiment_name, print_json, text, workspace, write_line
from airflow_amlrun.cli.run_file import load_run_file
from airflow_amlrun.errors import ConfigurationError

if TYPE_CHECKING:
    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.run import ScriptRun
    from airflow_amlrun.workspace import Workspace


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun import progress
    from airflow_amlrun.experiment import Experiment

    spec = load_run_file(args.config)
    config = spec.config
    if args.target is not None:
        config = replace(config, compute_target=args.target)
    name = spec.experiment_or(args.experiment, f"Run file {args.config!r}")
    ws = workspace(args)
    with progress.reporting(ProgressBars()):
        run = Experiment(ws, name).submit(config, tags=spec.tags)
    try:
        spec.name_run(ws, run.id)
    except BaseException as err:
        # The run started, and nobody follows it yet: it is stopped and recorded Canceled, not left running
        # unseen while its row says Running.
        why = f"{error_line(err)} ({type(err).__name__})" if str(err) else type(err).__name__
        run.cancel(reason=f"Canceled: naming it as its run file says failed: {why}.")
        raise
    console.print(f"Run {run.id} submitted to {config.compute_target} (experiment {name})", highlight=False)
    if not args.wait:
        log = follow_elsewhere(ws, run, args.conn_id)
        console.print(
            f"It is followed in the background (its follower's log: {log}); "
            f"`amlrun runs logs {run.id} --follow` shows its output.",
            highlight=False,
        )
        if args.json:
            print_json(console, {"run_id": run.id, "experiment": name, "status": str(run.get_status())})
        return 0
    return _follow_here(ws, run, console, args.json)


def follow_elsewhere(ws: Workspace, run: ScriptRun, conn_id: str | None) -> Path:
    """Hand the run over to a process of its own that follows it to its end (and records it), so this command
    may end; returns the file that process writes what it says to."""
    state = run.hand_over()
    folder = ws.cache_dir / "followers"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{run.id}.log"
    with log.open("ab") as out:
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airflow_amlrun.cli.follow",
                run.id,
                json.dumps(state.to_json()),
                *(["--conn-id", conn_id] if conn_id else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ.copy(),
        )
    return log


def _follow_here(
    ws: Workspace, run: ScriptRun, console: Console, as_json: bool, secrets: Mapping[str, str] | None = None
) -> int:
    """Print the run's output as it comes (as the terminal may show it), then its outcome; 0 if it Completed."""
    from airflow_amlrun.run_log import RunLog, masked

    shown_line = RunLog(ws, run.id).shown
    hidden = [value for value in (secrets or {}).values() if value]

    def show(line: str) -> None:
        # The run's secret values never reach the terminal, as they never reach a task log.
        write_line(shown_line(masked(line, hidden)))

    try:
        record: RunRecord = run.wait_for_completion(raise_on_error=False, output=show)
    except KeyboardInterrupt:
        console.print(f"Interrupted: run {run.id} was stopped (recorded Canceled).", highlight=False)
        return 130
    outcome = f"Run {record.id}: {record.status}"
    console.print(f"{outcome}, {record.error}" if record.error else outcome, highlight=False)
    if as_json:
        print_json(console, record.summary())
    return 0 if str(record.status) == "Completed" else 1


def cmd_rerun(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun import progress
    from airflow_amlrun.run import rerun

    ws = workspace(args)
    secrets = {}
    for name in args.secret:
        if name not in os.environ:
            raise ConfigurationError(f"--secret {name}: the variable {name} is not set in this environment.")
        secrets[name] = os.environ[name]
    with progress.reporting(ProgressBars()):
        run = rerun(ws, args.run_id, compute_target=args.target, secret_environment_variables=secrets)
    console.print(f"Run {run.id} re-runs {args.run_id}; its output follows.", highlight=False)
    return _follow_here(ws, run, console, args.json, secrets)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `submit` and `rerun`."""
    submit = sub.add_parser(
        "submit",
        help="start a run from a YAML run file (a ScriptRunConfig's fields, plus experiment, tags, display_name, "
        "description, environment_file); with --wait, follow it here: exit 0 if it Completed, 1 otherwise",
    )
    submit.add_argument("config", type=text("run file"), metavar="CONFIG.yaml")
    submit.add_argument(
        "--target", type=text("compute target"), default=None, help="compute target, replacing the file's"
    )
    submit.add_argument(
        "--experiment", type=experiment_name, default=None, help="experiment, replacing the file's"
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="print the run's output as it comes and wait for its end (else a process of its own follows it)",
    )
    submit.add_argument("--json", action="store_true", help="print the run's summary as JSON at the end")
    submit.set_defaults(func=cmd_submit)

    again = sub.add_parser(
        "rerun",
        help="run a recorded run again (its code, environment version, arguments and config) as a new run, "
        "and follow it; exit 0 if it Completed, 1 otherwise",
    )
    again.add_argument("run_id", type=text("run id"))
    again.add_argument(
        "--target",
        type=text("compute target"),
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
