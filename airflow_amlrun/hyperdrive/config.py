"""HyperDriveConfig: a sweep of one ScriptRunConfig over a parameter space."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Any

from airflow_amlrun.errors import ConfigurationError, shown
from airflow_amlrun.estimator import Estimator
from airflow_amlrun.hyperdrive.parameters import BayesianParameterSampling, ParameterSampling
from airflow_amlrun.hyperdrive.policies import EarlyTerminationPolicy, NoTerminationPolicy
from airflow_amlrun.runconfig import ScriptRunConfig

GOALS = ("maximize", "minimize")
# What a sweep needs; None until given, as run_config may come from estimator= instead (__post_init__ names
# what is missing).
_REQUIRED: Any = None
_REQUIRED_FIELDS = (
    "run_config",
    "hyperparameter_sampling",
    "primary_metric_name",
    "primary_metric_goal",
    "max_total_runs",
)


@dataclass
class HyperDriveConfig:
    """A sweep: runs of ``run_config``, each with its own parameters appended to its arguments (``--alpha 0.1``).

    :param run_config: what each run executes, and where.
    :param hyperparameter_sampling: GridParameterSampling, RandomParameterSampling or BayesianParameterSampling.
    :param primary_metric_name: the metric the runs log (``Run.log``) that ranks them.
    :param primary_metric_goal: ``"maximize"`` or ``"minimize"`` it.
    :param max_total_runs: how many runs at most (a grid also stops when it is walked).
    :param max_concurrent_runs: how many at once (default: 4, at most max_total_runs).
    :param max_duration_minutes: stop the sweep (its live runs Canceled) after this long.
    :param policy: early termination of runs that do worse (default: none).
    :param estimator: an Estimator (SKLearn, PyTorch, ...) in place of run_config: its ScriptRunConfig.
    """

    run_config: ScriptRunConfig = _REQUIRED
    hyperparameter_sampling: ParameterSampling = _REQUIRED
    primary_metric_name: str = _REQUIRED
    primary_metric_goal: str = _REQUIRED
    max_total_runs: int = _REQUIRED
    max_concurrent_runs: int | None = None
    max_duration_minutes: float | None = None
    policy: EarlyTerminationPolicy | None = field(default=None)
    estimator: InitVar[Estimator | None] = None

    def __post_init__(self, estimator: Estimator | None) -> None:
        if estimator is not None:
            if not isinstance(estimator, Estimator):
                raise ConfigurationError(
                    f"HyperDriveConfig: estimator must be an Estimator (SKLearn, PyTorch, ...), not {shown(estimator)}."
                )
            if self.run_config is not None:
                raise ConfigurationError("HyperDriveConfig: give run_config or estimator, not both.")
            self.run_config = estimator.run_config
        missing = [name for name in _REQUIRED_FIELDS if getattr(self, name) is None]
        if missing:
            raise ConfigurationError(
                f"HyperDriveConfig: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
                + (" (give run_config=, or estimator=)." if "run_config" in missing else ".")
            )
        if not isinstance(self.run_config, ScriptRunConfig):
            raise ConfigurationError(
                f"HyperDriveConfig: run_config must be a ScriptRunConfig, not {type(self.run_config).__name__}."
            )
        if self.run_config.command is not None:
            raise ConfigurationError(
                f"HyperDriveConfig: run_config runs a command ({shown(self.run_config.command)}), and a sweep passes "
                "each run's values to a script, as arguments (--name value): give run_config a script= instead, "
                "e.g. ScriptRunConfig(source_directory, script='train.py'), and read the values with argparse."
            )
        if not isinstance(self.hyperparameter_sampling, ParameterSampling):
            raise ConfigurationError(
                "HyperDriveConfig: hyperparameter_sampling must be GridParameterSampling, RandomParameterSampling or "
                f"BayesianParameterSampling, not {shown(self.hyperparameter_sampling)}."
            )
        if not isinstance(self.primary_metric_name, str) or not self.primary_metric_name.strip():
            raise ConfigurationError(
                f"HyperDriveConfig: primary_metric_name={shown(self.primary_metric_name)} must name a metric the "
                "script logs, e.g. 'accuracy'."
            )
        goal = str(getattr(self.primary_metric_goal, "value", self.primary_metric_goal)).lower()
        if goal not in GOALS:
            raise ConfigurationError(
                f"HyperDriveConfig: primary_metric_goal={shown(self.primary_metric_goal)} must be 'maximize' or "
                "'minimize'."
            )
        self.primary_metric_goal = goal
        for what, value in (
            ("max_total_runs", self.max_total_runs),
            ("max_concurrent_runs", self.max_concurrent_runs),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(
                    f"HyperDriveConfig: {what}={shown(value)} must be a whole number >= 1."
                )
        if self.max_concurrent_runs is None:
            self.max_concurrent_runs = min(4, self.max_total_runs)
        limit = self.max_duration_minutes
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
            or limit <= 0
        ):
            raise ConfigurationError(
                f"HyperDriveConfig: max_duration_minutes={shown(limit)} must be a positive number, or None."
            )
        if self.policy is None:
            self.policy = NoTerminationPolicy()
        if not isinstance(self.policy, EarlyTerminationPolicy):
            raise ConfigurationError(
                f"HyperDriveConfig: policy must be BanditPolicy, MedianStoppingPolicy, TruncationSelectionPolicy "
                f"or NoTerminationPolicy, not {shown(self.policy)}."
            )
        if isinstance(self.hyperparameter_sampling, BayesianParameterSampling) and not isinstance(
            self.policy, NoTerminationPolicy
        ):
            raise ConfigurationError(
                "HyperDriveConfig: Bayesian sampling learns from every run's final metric, so it takes no early "
                f"termination policy ({type(self.policy).__name__}); use NoTerminationPolicy or random sampling."
            )
        taken = [
            n for n in self.hyperparameter_sampling.parameter_space if _flag(n) in _flags(self.run_config)
        ]
        if taken:
            raise ConfigurationError(
                f"HyperDriveConfig: run_config.arguments already give {', '.join(map(repr, taken))}, which the sweep "
                "sets for each run: remove them from the arguments."
            )

    @property
    def goal(self) -> str:
        return str(self.primary_metric_goal)

    def to_dict(self) -> dict[str, Any]:
        """The sweep as its parent run records it."""
        assert self.policy is not None
        return {
            "sampling": self.hyperparameter_sampling.to_dict(),
            "policy": self.policy.to_dict(),
            "primary_metric_name": self.primary_metric_name,
            "primary_metric_goal": self.goal,
            "max_total_runs": self.max_total_runs,
            "max_concurrent_runs": self.max_concurrent_runs,
            "max_duration_minutes": self.max_duration_minutes,
        }


def _flag(name: str) -> str:
    return name if name.startswith("-") else f"--{name}"


def _flags(config: ScriptRunConfig) -> set[str]:
    return {str(a).split("=", 1)[0] for a in config.arguments or [] if str(a).startswith("-")}
