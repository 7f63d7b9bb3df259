"""The pure parts of the run API: metric series as Azure ML gives them, a run's details, and where a download
writes each file."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.history import MetricPoint, RunRecord, RunStatus
from airflow_amlrun.run_api import _destinations, _relative_destination, metric_values, run_details

NAMES = st.sampled_from(["loss", "acc", "lr"])


@given(st.lists(st.tuples(NAMES, st.floats(allow_nan=False)), max_size=30))
def test_a_metric_logged_once_is_its_value_and_one_logged_more_is_its_series(logged):
    points = [MetricPoint(name, value, seq=i) for i, (name, value) in enumerate(logged)]
    got = metric_values(points)
    assert list(got) == list(dict.fromkeys(name for name, _ in logged))
    for name, value in got.items():
        series = [v for n, v in logged if n == name]
        assert value == (series[0] if len(series) == 1 else series)


def record(**changes):
    fields = dict(
        id="exp_1_abcd",
        experiment="exp",
        status=RunStatus.FAILED,
        target="ssh_vm",
        script="train.py",
        command=None,
        arguments=["--alpha", "0.1"],
        environment={"name": "env", "version": "2", "framework": "pyspark"},
        snapshot_id="f" * 64,
        git={"commit": "abc", "branch": "main", "dirty": True, "repository_uri": "https://host/repo"},
        tags={},
        handle=None,
        outputs_uri=None,
        logs_uri=None,
        error="The script failed (exit code 1).",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        start=datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
        end=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        dag_id="retrain",
        task_id="train",
        airflow_run_id="manual_1",
        map_index=None,
        try_number=2,
        config={"environment_variables": {"MODE": "fast"}},
    )
    fields.update(changes)
    return RunRecord(**fields)


def test_details_name_the_run_its_definition_properties_and_error():
    details = run_details(record(), {"logs/std_log.txt": "/store/runs/exp_1_abcd/logs/std_log.txt"})
    assert details["startTimeUtc"] == "2026-01-01T00:00:01.000Z"
    assert details["runDefinition"]["framework"] == "PySpark"
    assert details["runDefinition"]["environmentVariables"] == {"MODE": "fast"}
    assert details["properties"]["azureml.git.commit"] == "abc"
    assert details["properties"]["azureml.git.dirty"] == "True"
    assert details["properties"]["amlrun.airflow.try_number"] == "2"
    assert details["error"] == {"error": {"code": "Failed", "message": "The script failed (exit code 1)."}}
    assert details["submittedBy"] == "Airflow task retrain.train"
    assert "displayName" not in details and "inputDatasets" not in details


def test_a_run_outside_airflow_and_git_has_no_such_properties():
    details = run_details(record(dag_id=None, git=None, error=None, display_name="x"), {})
    assert not [key for key in details["properties"] if key.startswith(("azureml.git", "amlrun.airflow"))]
    assert details["submittedBy"] is None and details["displayName"] == "x" and "error" not in details


# Few letters, so that names often share the rest after a prefix.
PARTS = st.lists(st.sampled_from(["a", "b", "a1", "1"]), min_size=1, max_size=3).map("/".join)


@given(
    st.lists(PARTS.map(lambda rest: f"outputs/{rest}"), unique=True, max_size=6),
    st.sampled_from([None, "outputs/", "outputs/a", "outputs/a/", "outputs/a1"]),
    st.booleans(),
)
def test_a_download_writes_each_file_to_a_path_of_its_own_or_refuses_naming_two_that_would_clash(
    names, prefix, append_prefix
):
    names = [n for n in names if prefix is None or n.startswith(prefix)]
    relatives = [_relative_destination(n, prefix, append_prefix) for n in names]
    same = len(set(relatives)) != len(relatives)
    nested = any(inner.startswith(outer + "/") for inner in relatives for outer in relatives)
    if not same and not nested:
        assert _destinations(names, prefix, append_prefix) == list(zip(names, relatives, strict=True))
        return
    with pytest.raises(ConfigurationError, match="nothing was downloaded") as raised:
        _destinations(names, prefix, append_prefix)
    if same:
        named = re.search(r"the run's file '(.+)' and its file '(.+)' to '(.+)' in", str(raised.value))
        assert named is not None
        first, second, relative = named.groups()
        assert first != second and {first, second} <= set(names)
        assert _relative_destination(first, prefix, append_prefix) == relative
        assert _relative_destination(second, prefix, append_prefix) == relative
        return
    named = re.search(
        r"file '(.+)' to '(.+)' in the output directory, and its file '(.+)' to '(.+)', ", str(raised.value)
    )
    assert named is not None
    outer_name, outer, inner_name, inner = named.groups()
    assert {outer_name, inner_name} <= set(names)
    assert _relative_destination(outer_name, prefix, append_prefix) == outer
    assert _relative_destination(inner_name, prefix, append_prefix) == inner
    assert inner.startswith(outer + "/")


def test_a_file_where_another_needs_a_folder_is_refused_before_anything_is_written():
    names = ["outputs/ab", "outputs/a/b/c"]
    with pytest.raises(ConfigurationError) as raised:
        _destinations(names, "outputs/a", append_prefix=False)
    assert str(raised.value) == (
        "download_files(prefix='outputs/a', append_prefix=False) would write the run's file 'outputs/ab' to 'b' "
        "in the output directory, and its file 'outputs/a/b/c' to 'b/c', beneath a folder of that same name: "
        "nothing was downloaded. Pass append_prefix=True to keep each file's whole name, or download them with "
        "two prefixes."
    )


def test_two_files_with_the_same_rest_after_the_prefix_are_refused_with_the_fix():
    names = ["outputs/run1/model.pkl", "outputs/run/1/model.pkl"]
    with pytest.raises(ConfigurationError) as raised:
        _destinations(names, "outputs/run", append_prefix=False)
    assert str(raised.value) == (
        "download_files(prefix='outputs/run', append_prefix=False) would write both the run's file "
        "'outputs/run1/model.pkl' and its file 'outputs/run/1/model.pkl' to '1/model.pkl' in the output "
        "directory, one over the other: nothing was downloaded. Pass append_prefix=True to keep each file's "
        "whole name, or a narrower prefix such as 'outputs/run/'."
    )
    assert _destinations(names, "outputs/run", append_prefix=True) == [(n, n) for n in names]
