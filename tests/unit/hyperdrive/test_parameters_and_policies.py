"""Sampling and early termination of sweeps: pure logic (the sweep itself runs in
tests/integration/test_hyperdrive.py)."""

from __future__ import annotations

import math

import pytest

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.hyperdrive import (
    BanditPolicy,
    BayesianParameterSampling,
    GridParameterSampling,
    HyperDriveConfig,
    MedianStoppingPolicy,
    RandomParameterSampling,
    TruncationSelectionPolicy,
    choice,
    loguniform,
    normal,
    qloguniform,
    quniform,
    randint,
    uniform,
)
from airflow_amlrun.runconfig import ScriptRunConfig


def draws(sampling: RandomParameterSampling, n: int) -> list[dict[str, object]]:
    # Imported here, not as the module is collected: every process of `make unit` collects it, one runs these.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampling.sampler())
    space = sampling.parameter_space
    out = []
    for _ in range(n):
        trial = study.ask({k: e.distribution() for k, e in space.items()})
        out.append({k: space[k].value(trial.params[k]) for k in space})
        study.tell(trial, 0.0)
    return out


def test_random_sampling_draws_every_expression_in_its_range_and_repeats_with_its_seed() -> None:
    space = {
        "--c": choice("a", "b"),
        "--i": randint(5),
        "--u": uniform(-1, 1),
        "--q": quniform(0, 10, 0.5),
        "--l": loguniform(-3, 0),
        "--ql": qloguniform(0, 4, 2),
        "--n": normal(10, 2),
    }
    first = draws(RandomParameterSampling(space, seed=3), 200)
    assert first == draws(RandomParameterSampling(space, seed=3), 200)
    assert first != draws(RandomParameterSampling(space, seed=4), 200)
    for p in first:
        assert p["--c"] in ("a", "b")
        assert p["--i"] in range(5)
        assert -1 <= p["--u"] <= 1  # type: ignore[operator]
        assert 0 <= p["--q"] <= 10 and (p["--q"] / 0.5).is_integer()  # type: ignore[operator,union-attr]
        assert math.exp(-3) <= p["--l"] <= 1  # type: ignore[operator]
        assert isinstance(p["--ql"], int) and p["--ql"] % 2 == 0
    normals = [p["--n"] for p in first]
    assert abs(sum(normals) / len(normals) - 10) < 0.6  # type: ignore[arg-type]


def test_grid_sampling_walks_the_product_in_order_and_takes_choices_only() -> None:
    grid = GridParameterSampling({"--a": choice(1, 2), "--b": choice("x", "y", "z")})
    assert grid.size() == 6
    assert list(grid.grid())[:3] == [{"--a": 1, "--b": "x"}, {"--a": 1, "--b": "y"}, {"--a": 1, "--b": "z"}]
    with pytest.raises(ConfigurationError, match="choice\\(\\) expressions only; '--lr' is uniform"):
        GridParameterSampling({"--lr": uniform(0, 1)})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: uniform(1, 1), "min_value < max_value"),
        (lambda: randint(0), "upper >= 1"),
        (lambda: quniform(0, 1, 0), "q must be > 0"),
        (lambda: normal(0, -1), "sigma must be > 0"),
        (lambda: choice(), "at least one value"),
        (lambda: choice([1, 2], [3]), "must be a string, number or boolean"),
        (lambda: RandomParameterSampling({"--a": 0.1}), "must be an expression"),
        (lambda: RandomParameterSampling({}), "needs a parameter space"),
        (lambda: BanditPolicy(), "exactly one of slack_factor or slack_amount"),
        (lambda: BanditPolicy(slack_factor=-1), "slack_factor=-1 must be a number >= 0"),
        (lambda: TruncationSelectionPolicy(0), "from 1 to 99"),
        (lambda: MedianStoppingPolicy(evaluation_interval=0), "evaluation_interval=0"),
    ],
)
def test_bad_expressions_and_policies_are_named(make, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=message):
        make()


def test_a_config_refuses_what_cannot_sweep(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_config = ScriptRunConfig(tmp_path, script="train.py", arguments=["--alpha", "1"])
    common = {"primary_metric_name": "loss", "primary_metric_goal": "minimize", "max_total_runs": 4}
    with pytest.raises(ConfigurationError, match="already give '--alpha'"):
        HyperDriveConfig(run_config, RandomParameterSampling({"--alpha": uniform(0, 1)}), **common)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="primary_metric_goal='down'"):
        HyperDriveConfig(run_config, RandomParameterSampling({"--beta": uniform(0, 1)}), "loss", "down", 4)
    with pytest.raises(ConfigurationError, match="takes no early termination policy"):
        HyperDriveConfig(
            run_config,
            BayesianParameterSampling({"--beta": uniform(0, 1)}),
            policy=BanditPolicy(slack_factor=0.1),
            **common,  # type: ignore[arg-type]
        )
    config = HyperDriveConfig(run_config, RandomParameterSampling({"--beta": uniform(0, 1)}), **common)  # type: ignore[arg-type]
    assert config.max_concurrent_runs == 4 and config.goal == "minimize"


def test_a_config_refuses_a_command_before_anything_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A sweep gives each run its values as arguments of a script: a command has nowhere to take them.
    run_config = ScriptRunConfig(tmp_path, command="python train.py --alpha 1")
    with pytest.raises(
        ConfigurationError,
        match=r"run_config runs a command \('python train.py --alpha 1'\).*give run_config a script= instead",
    ):
        HyperDriveConfig(
            run_config, RandomParameterSampling({"--beta": uniform(0, 1)}), "loss", "minimize", 4
        )


def test_bandit_compares_each_report_with_the_best_run_at_the_same_report() -> None:
    policy = BanditPolicy(slack_factor=0.2, delay_evaluation=1)
    reports = {"good": [10.0, 9.0, 8.0], "close": [11.0, 10.5], "bad": [20.0, 19.0]}
    reason = policy.stop_reason("bad", reports, "minimize")
    assert reason is not None and "19 is outside slack_factor 0.2 of the best run's 9" in reason
    assert policy.stop_reason("close", reports, "minimize") is None  # 10.5 <= 9 * 1.2
    # Not due before delay_evaluation reports have passed.
    assert policy.stop_reason("bad", {"good": [1.0], "bad": [100.0]}, "minimize") is None
    # Maximizing: below best / (1 + slack).
    up = BanditPolicy(slack_amount=0.1)
    assert up.stop_reason("low", {"top": [0.9], "low": [0.7]}, "maximize") is not None
    assert up.stop_reason("near", {"top": [0.9], "near": [0.85]}, "maximize") is None


def test_median_and_truncation_stop_the_runs_below_the_pack() -> None:
    reports = {"a": [1.0, 1.0], "b": [2.0, 2.0], "c": [3.0, 3.0], "d": [9.0, 9.0]}
    median = MedianStoppingPolicy()
    assert median.stop_reason("d", reports, "minimize") is not None
    assert median.stop_reason("a", reports, "minimize") is None
    truncation = TruncationSelectionPolicy(25)
    assert truncation.stop_reason("d", reports, "minimize") is not None
    assert truncation.stop_reason("c", reports, "minimize") is None
    assert truncation.stop_reason("a", reports, "maximize") is not None


def test_bandit_keeps_the_best_run_of_a_metric_at_or_below_zero() -> None:
    policy = BanditPolicy(slack_factor=0.1)
    negative = {"best": [-10.0], "worse": [-8.0], "near": [-9.5]}
    assert policy.stop_reason("best", negative, "minimize") is None
    assert policy.stop_reason("near", negative, "minimize") is None
    assert policy.stop_reason("worse", negative, "minimize") is not None
    assert policy.stop_reason("top", {"top": [-1.0], "low": [-2.0]}, "maximize") is None
    assert policy.stop_reason("low", {"top": [-1.0], "low": [-2.0]}, "maximize") is not None
    # Maximizing a positive metric: below best / (1 + slack).
    assert policy.stop_reason("b", {"a": [1.1], "b": [0.99]}, "maximize") is not None
    assert policy.stop_reason("b", {"a": [1.1], "b": [1.01]}, "maximize") is None


def test_a_policy_is_due_at_its_interval_after_its_delay() -> None:
    policy = MedianStoppingPolicy(evaluation_interval=2, delay_evaluation=1)
    assert [n for n in range(1, 9) if policy.due(n)] == [2, 4, 6, 8]


def test_truncation_stops_runs_tied_wholly_inside_the_cut_and_keeps_ties_across_it() -> None:
    half = TruncationSelectionPolicy(50)
    inside = {"a": [9.0], "b": [9.0], "c": [1.0], "d": [2.0]}
    assert half.stop_reason("a", inside, "minimize") is not None
    across = {"a": [9.0], "b": [5.0], "c": [5.0], "d": [1.0]}
    assert half.stop_reason("b", across, "minimize") is None
    assert half.stop_reason("a", across, "minimize") is not None


def test_one_argument_named_twice_and_out_of_range_exponents_are_refused() -> None:
    from airflow_amlrun.hyperdrive.parameters import argument_words

    with pytest.raises(ConfigurationError, match="'alpha' and '--alpha' are the same argument --alpha"):
        RandomParameterSampling({"alpha": uniform(0, 1), "--alpha": uniform(0, 1)})
    with pytest.raises(ConfigurationError, match="exponents between -700 and 700"):
        loguniform(-800, 0)
    assert argument_words("shift", -1) == ["--shift=-1"]
    assert argument_words("--mode", "fast") == ["--mode", "fast"]
