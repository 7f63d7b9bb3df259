"""Hyperparameter sweeps (HyperDrive): a ScriptRunConfig run over a parameter space, with early termination.

from airflow_amlrun.hyperdrive import BanditPolicy, HyperDriveConfig, RandomParameterSampling, choice, uniform

config = HyperDriveConfig(
    run_config=ScriptRunConfig("src", script="train.py"),
    hyperparameter_sampling=RandomParameterSampling({"--alpha": uniform(0.01, 1), "--depth": choice(2, 4)}, seed=1),
    policy=BanditPolicy(slack_factor=0.1, delay_evaluation=2),
    primary_metric_name="rmse",
    primary_metric_goal="minimize",
    max_total_runs=12,
    max_concurrent_runs=3,
)
sweep = Experiment(ws, "tuning").submit(config)
sweep.wait_for_completion()
sweep.get_best_run_by_primary_metric()
"""

from airflow_amlrun.hyperdrive.config import HyperDriveConfig
from airflow_amlrun.hyperdrive.parameters import (
    BayesianParameterSampling,
    GridParameterSampling,
    RandomParameterSampling,
    choice,
    loguniform,
    normal,
    qloguniform,
    quniform,
    randint,
    uniform,
)
from airflow_amlrun.hyperdrive.policies import (
    BanditPolicy,
    MedianStoppingPolicy,
    NoTerminationPolicy,
    TruncationSelectionPolicy,
)
from airflow_amlrun.hyperdrive.sweep import HyperDriveRun

__all__ = [
    "BanditPolicy",
    "BayesianParameterSampling",
    "GridParameterSampling",
    "HyperDriveConfig",
    "HyperDriveRun",
    "MedianStoppingPolicy",
    "NoTerminationPolicy",
    "RandomParameterSampling",
    "TruncationSelectionPolicy",
    "choice",
    "loguniform",
    "normal",
    "qloguniform",
    "quniform",
    "randint",
    "uniform",
]
