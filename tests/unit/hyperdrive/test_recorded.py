"""What the run page and `amlrun runs show` say of a sweep, read from its parent run's row: the recorded
search space and policy written as the Python that makes them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun import hyperdrive
from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.hyperdrive import (
    BanditPolicy,
    HyperDriveConfig,
    NoTerminationPolicy,
    RandomParameterSampling,
    choice,
    loguniform,
    normal,
    qloguniform,
    quniform,
    randint,
    uniform,
)
from airflow_amlrun.hyperdrive.parameters import Expression
from airflow_amlrun.hyperdrive.recorded import (
    DRAWN,
    RecordedSweep,
    expression_text,
    policy_text,
    runs_to_read,
    shared_git,
)
from airflow_amlrun.runconfig import SWEEP_TARGET, ScriptRunConfig

_NUMBER = st.floats(-500, 500, allow_nan=False)
_STEP = st.floats(0.001, 100)


def _ordered(
    make: Callable[..., Expression], *more: st.SearchStrategy[float]
) -> st.SearchStrategy[Expression]:
    """Expressions of a range: its bounds in order, then `more` (a step)."""
    return st.tuples(_NUMBER, _NUMBER, *more).filter(lambda t: t[0] < t[1]).map(lambda t: make(*t))


EXPRESSIONS = st.one_of(
    st.lists(
        st.one_of(st.text(max_size=8), st.integers(), _NUMBER, st.booleans()), min_size=1, max_size=4
    ).map(lambda values: choice(*values)),
    st.integers(1, 10**6).map(randint),
    _ordered(uniform),
    _ordered(quniform, _STEP),
    _ordered(loguniform),
    _ordered(qloguniform, _STEP),
    st.tuples(_NUMBER, st.floats(0.001, 100)).map(lambda t: normal(*t)),
)


@given(EXPRESSIONS)
def test_a_recorded_expression_reads_as_the_python_that_makes_it(expression: Expression) -> None:
    # As the parent run's row holds it: JSON.
    recorded = json.loads(json.dumps({"kind": expression.kind, "args": list(expression.args)}))
    assert eval(expression_text(recorded), vars(hyperdrive)) == expression


def test_a_policy_reads_as_the_python_that_makes_it_and_none_is_none() -> None:
    bandit = BanditPolicy(slack_factor=0.1, delay_evaluation=2)
    assert eval(policy_text(bandit.to_dict()) or "", vars(hyperdrive)).to_dict() == bandit.to_dict()
    assert policy_text(NoTerminationPolicy().to_dict()) is None


def test_a_sweep_s_row_says_how_it_searched_and_what_each_run_adds() -> None:
    config = HyperDriveConfig(
        run_config=ScriptRunConfig(".", script="train.py", arguments=["--epochs", "3"]),
        hyperparameter_sampling=RandomParameterSampling(
            {"--alpha": uniform(0, 1), "depth": choice(2, 4)}, seed=7
        ),
        primary_metric_name="rmse",
        primary_metric_goal="minimize",
        max_total_runs=12,
        max_concurrent_runs=3,
    )
    parent = parent_run(config)
    assert RecordedSweep.of(parent) == RecordedSweep(
        sampling="random",
        seed=7,
        parameter_space={"--alpha": "uniform(0.0, 1.0)", "depth": "choice(2, 4)"},
        drawn_arguments=["--alpha", DRAWN, "--depth", DRAWN],
        primary_metric_name="rmse",
        primary_metric_goal="minimize",
        policy=None,
        max_total_runs=12,
        max_concurrent_runs=3,
        max_duration_minutes=None,
    )
    # A run of the sweep, or a sweep recorded without its config, says nothing of a search.
    assert RecordedSweep.of(replace(parent, target="local")) is None
    assert RecordedSweep.of(replace(parent, config=None)) is None


def test_what_a_sweep_has_none_of_is_read_in_its_best_and_first_runs() -> None:
    config = HyperDriveConfig(
        run_config=ScriptRunConfig(".", script="train.py"),
        hyperparameter_sampling=RandomParameterSampling({"--alpha": uniform(0, 1)}),
        primary_metric_name="rmse",
        primary_metric_goal="minimize",
        max_total_runs=3,
    )
    sweep = parent_run(config)
    first, second = (replace(sweep, id=f"tuning_{i}", target="local", config=None) for i in (2, 3))
    best_second = replace(sweep, tags={"best_run_id": second.id})

    def said(parent: RunRecord, *runs: RunRecord) -> str:
        return runs_to_read(parent, runs, "amlrun runs show", "shows")

    assert said(best_second, first, second) == (
        "`amlrun runs show tuning_3` shows its best run's, `amlrun runs show tuning_2` its first run's (2 runs in all)."
    )
    assert said(replace(sweep, tags={"best_run_id": first.id}), first, second) == (
        "`amlrun runs show tuning_2` shows its first run's, its best (2 runs in all)."
    )
    # No best run yet (none reported its metric).
    assert said(sweep, first) == "`amlrun runs show tuning_2` shows its first run's (1 run in all)."
    assert said(sweep) == "It recorded no runs."
    assert said(replace(sweep, status=RunStatus.RUNNING)) == "None of its runs is recorded yet."


def parent_run(config: HyperDriveConfig) -> RunRecord:
    """The row HyperDriveRun.submit writes for the sweep `config`."""
    now = datetime.now(UTC)
    return RunRecord(
        id="tuning_1_abcd",
        experiment="tuning",
        status=RunStatus.COMPLETED,
        target=SWEEP_TARGET,
        script=config.run_config.script,
        command=None,
        arguments=list(config.run_config.arguments or []),
        environment=None,
        snapshot_id=None,
        git=None,
        tags={"run_type": "hyperdrive"},
        handle=None,
        outputs_uri=None,
        logs_uri=None,
        error=None,
        created_at=now,
        start=now,
        end=now,
        dag_id=None,
        task_id=None,
        airflow_run_id=None,
        map_index=None,
        try_number=None,
        config={"hyperdrive": config.to_dict(), "run_config": config.run_config.to_dict()},
    )


def test_the_git_state_a_sweep_s_runs_share_is_theirs_only_when_every_run_recorded_the_same() -> None:
    sweep = parent_run(
        HyperDriveConfig(
            run_config=ScriptRunConfig(".", script="train.py"),
            hyperparameter_sampling=RandomParameterSampling({"--alpha": uniform(0, 1)}),
            primary_metric_name="rmse",
            primary_metric_goal="minimize",
            max_total_runs=3,
        )
    )
    clean = {"repository_uri": None, "branch": "tuning", "commit": "c" * 40, "dirty": False, "build_id": None}
    edited = {**clean, "dirty": True, "diff_digest": "d" * 64}

    assert shared_git([clean, dict(clean)]) == clean
    recorded = RecordedSweep.of(sweep)
    assert recorded is not None and recorded.git is None
    assert RecordedSweep.of(sweep, [clean, clean]) == replace(recorded, git=clean)
    # The same uncommitted change is the same diff, stored once under its content's digest.
    assert shared_git([edited, dict(edited)]) == edited
    # An edit or a commit while the sweep ran: each run's page says what it ran.
    assert shared_git([clean, edited]) is None
    assert shared_git([clean, {**clean, "commit": "e" * 40}]) is None
    assert shared_git([edited, {**edited, "diff_digest": "f" * 64}]) is None
    # No git checkout, a checkout with no commit yet, no run yet.
    assert shared_git([None, None]) is None
    assert shared_git([{**clean, "commit": None}]) is None
    assert shared_git([]) is None
