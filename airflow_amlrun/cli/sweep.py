"""`amlrun sweep`: a HyperDriveConfig from a YAML file, run to its end here, its runs listed best first.

The file holds HyperDriveConfig's fields; ``run_config`` is a run file's mapping (see `amlrun submit`), whose
tags, display_name and description are recorded on the sweep's parent run (as HyperDriveOperator's tags are),
the sampling and the policy name their class by ``type`` and give its arguments beside it, and each parameter's
expression is a mapping from the function's name to its arguments::

    experiment: tuning
    run_config: {source_directory: src, script: train.py, compute_target: local, tags: {team: forecasting}}
    hyperparameter_sampling:
      type: random                      # grid, random or bayesian
      seed: 1
      parameter_space:
        --alpha: {uniform: [0.01, 1.0]}
        --depth: {choice: [2, 4, 8]}
    policy: {type: bandit, slack_factor: 0.1, delay_evaluation: 2}   # median_stopping, truncation_selection
    primary_metric_name: rmse
    primary_metric_goal: minimize
    max_total_runs: 12
    max_concurrent_runs: 3
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from airflow_amlrun.cli.bars import ProgressBars
from airflow_amlrun.cli.common import (
    cell,
    error_line,
    experiment_name,
    fmt,
    print_json,
    text,
    workspace,
    write_line,
)
from airflow_amlrun.cli.run_file import RunFile, checked_experiment, read_yaml, run_file
from airflow_amlrun.errors import ConfigurationError, shown

if TYPE_CHECKING:
    from airflow_amlrun.environment.paths import PathBase
    from airflow_amlrun.hyperdrive import HyperDriveConfig

SWEEP_KEYS = (
    "experiment",
    "run_config",
    "hyperparameter_sampling",
    "policy",
    "primary_metric_name",
    "primary_metric_goal",
    "max_total_runs",
    "max_concurrent_runs",
    "max_duration_minutes",
)
SAMPLINGS = ("grid", "random", "bayesian")
POLICIES = ("bandit", "median_stopping", "truncation_selection", "none")
EXPRESSIONS = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform", "normal")


def sweep_file(data: Mapping[str, Any], base: PathBase, where: str) -> tuple[HyperDriveConfig, RunFile]:
    """The sweep a sweep file's mapping describes, and its run_config as a run file's (with the sweep's own
    experiment, if it names one); what is wrong is named by its key."""
    from airflow_amlrun.hyperdrive import HyperDriveConfig

    unknown = sorted(str(key) for key in data if key not in SWEEP_KEYS)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown key(s) {', '.join(map(shown, unknown))}; the keys of a sweep file are "
            f"{', '.join(SWEEP_KEYS)}."
        )
    for key in ("run_config", "hyperparameter_sampling"):
        if not isinstance(data.get(key), Mapping):
            raise ConfigurationError(
                f"{where}: {key} must be a mapping ({'the run file fields' if key == 'run_config' else 'type, '}"
                f"{'' if key == 'run_config' else 'parameter_space and seed'}), not {shown(data.get(key))}."
            )
    spec = run_file(data["run_config"], base, f"{where}: run_config")
    experiment = checked_experiment(data.get("experiment"), where)
    values = {
        key: data[key]
        for key in ("primary_metric_name", "primary_metric_goal", "max_total_runs", "max_concurrent_runs")
        if key in data
    }
    if "max_duration_minutes" in data:
        values["max_duration_minutes"] = data["max_duration_minutes"]
    try:
        config = HyperDriveConfig(
            run_config=spec.config,
            hyperparameter_sampling=_sampling(data["hyperparameter_sampling"], where),
            policy=_policy(data.get("policy"), where),
            **values,
        )
    except TypeError as err:
        raise ConfigurationError(f"{where}: {err}") from None
    except ConfigurationError as err:
        raise ConfigurationError(f"{where}: {err}") from None
    return config, replace(spec, experiment=experiment or spec.experiment)


def _sampling(data: Mapping[str, Any], where: str) -> Any:
    from airflow_amlrun.hyperdrive import (
        BayesianParameterSampling,
        GridParameterSampling,
        RandomParameterSampling,
    )

    where = f"{where}: hyperparameter_sampling"
    kind = data.get("type")
    if kind not in SAMPLINGS:
        raise ConfigurationError(f"{where}.type={shown(kind)} must be one of {', '.join(SAMPLINGS)}.")
    unknown = sorted(str(k) for k in data if k not in ("type", "parameter_space", "seed"))
    if unknown or (kind == "grid" and "seed" in data):
        raise ConfigurationError(
            f"{where}: unknown key(s) {', '.join(map(shown, unknown or ['seed']))}; it takes type, "
            f"parameter_space{'' if kind == 'grid' else ' and seed'}."
        )
    space = data.get("parameter_space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigurationError(
            f"{where}.parameter_space must map each parameter to an expression, e.g. "
            "{'--alpha': {'uniform': [0.01, 1.0]}}, not {shown(space)}."
        )
    expressions = {
        str(name): _expression(value, f"{where}.parameter_space[{name!r}]") for name, value in space.items()
    }
    if kind == "grid":
        return GridParameterSampling(expressions)
    chosen = RandomParameterSampling if kind == "random" else BayesianParameterSampling
    return chosen(expressions, seed=data.get("seed"))


def _expression(value: object, where: str) -> Any:
    from airflow_amlrun import hyperdrive

    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigurationError(
            f"{where} = {shown(value)} must be one function and its arguments, e.g. {{choice: [2, 4]}} or "
            f"{{uniform: [0.01, 1.0]}} (functions: {', '.join(EXPRESSIONS)})."
        )
    [(name, arguments)] = value.items()
    if name not in EXPRESSIONS:
        raise ConfigurationError(f"{where}: {shown(name)} is not one of {', '.join(EXPRESSIONS)}.")
    function = getattr(hyperdrive, name)
    try:
        if isinstance(arguments, Mapping):
            return function(**arguments)
        return function(*(arguments if isinstance(arguments, list) else [arguments]))
    except TypeError as err:
        raise ConfigurationError(f"{where}: {err}") from None
    except ConfigurationError as err:
        raise ConfigurationError(f"{where}: {err}") from None


def _policy(data: object, where: str) -> Any:
    from airflow_amlrun import hyperdrive

    if data is None:
        return None
    where = f"{where}: policy"
    if not isinstance(data, Mapping) or data.get("type") not in POLICIES:
        raise ConfigurationError(
            f"{where} = {shown(data)} must be a mapping whose type is one of {', '.join(POLICIES)}, with the "
            "policy's arguments beside it, e.g. {type: bandit, slack_factor: 0.1}."
        )
    names = {
        "bandit": "BanditPolicy",
        "median_stopping": "MedianStoppingPolicy",
        "truncation_selection": "TruncationSelectionPolicy",
        "none": "NoTerminationPolicy",
    }
    arguments = {str(k): v for k, v in data.items() if k != "type"}
    try:
        return getattr(hyperdrive, names[str(data["type"])])(**arguments)
    except TypeError as err:
        raise ConfigurationError(f"{where}: {err}") from None
    except ConfigurationError as err:
        raise ConfigurationError(f"{where}: {err}") from None


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun import progress
    from airflow_amlrun.experiment import Experiment

    data, base = read_yaml(args.config, "Sweep file")
    config, spec = sweep_file(data, base, f"Sweep file {args.config!r}")
    if args.target is not None:
        config = replace(config, run_config=replace(config.run_config, compute_target=args.target))
    name = spec.experiment_or(args.experiment, f"Sweep file {args.config!r}")
    ws = workspace(args)
    with progress.reporting(ProgressBars()):
        sweep = Experiment(ws, name).submit(config, tags=spec.tags)
        try:
            # From here the sweep is recorded: naming it failing, or Ctrl-C before it runs, ends it at once.
            with sweep.guarded():
                spec.name_run(ws, sweep.id)
                console.print(
                    f"Sweep {sweep.id}: up to {config.max_total_runs} runs, {config.max_concurrent_runs} at a "
                    f"time (experiment {name})",
                    highlight=False,
                )
                record = sweep.wait_for_completion(show_output=args.show_output, output=write_line)
        except KeyboardInterrupt:
            # What the interruption left is read back, not assumed: recording the end, or a stop, may have failed.
            try:
                recorded = f"the sweep is recorded {ws.get_run(sweep.id).status}"
            except Exception as err:
                # One line: a database error adds its statement and a link on lines of their own.
                why = error_line(err)[:200]
                recorded = (
                    f"reading how the sweep was recorded failed ({why}); `amlrun runs show {sweep.id}` tells"
                )
            raise KeyboardInterrupt(
                f"sweep {sweep.id}: the runs it had going were asked to stop, and {recorded}."
            ) from None
    rows = sweep.get_children_sorted_by_primary_metric()
    if args.json:
        print_json(console, {"sweep_run_id": sweep.id, "status": str(record.status), "children": rows})
        return 0 if str(record.status) == "Completed" else 1
    metric = config.primary_metric_name
    table = Table(title=f"Runs of sweep {sweep.id}, best first ({metric}, {config.goal})")
    for column in ("run id", "status", metric, "hyperparameters", "why it ended"):
        table.add_column(column, overflow="fold")
    for row in rows:
        parameters = " ".join(f"{k} {v}" for k, v in row["hyperparameters"].items())
        error = row["error"] if row["status"] != "Completed" else ""
        table.add_row(row["run_id"], row["status"], fmt(row[metric]), cell(parameters), cell(error or ""))
    console.print(table)
    best = sweep.get_best_run_by_primary_metric()
    outcome = f"Sweep {sweep.id}: {record.status}"
    console.print(f"{outcome}; best run {best.id}" if best else outcome, highlight=False)
    return 0 if str(record.status) == "Completed" else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `sweep`."""
    sweep = sub.add_parser(
        "sweep",
        help="run a hyperparameter sweep from a YAML file (a HyperDriveConfig's fields) to its end, then list its "
        "runs best first; exit 0 if the sweep Completed",
    )
    sweep.add_argument("config", type=text("sweep file"), metavar="CONFIG.yaml")
    sweep.add_argument(
        "--target", type=text("compute target"), default=None, help="compute target of its runs"
    )
    sweep.add_argument(
        "--experiment", type=experiment_name, default=None, help="experiment, replacing the file's"
    )
    sweep.add_argument("--show-output", action="store_true", help="print the runs' output as it comes")
    sweep.add_argument("--json", action="store_true", help="print the runs as JSON instead of a table")
    sweep.set_defaults(func=cmd_sweep)
