"""Re-running a recorded run: same code, exact environment version, arguments and config, as a new run that
names the old one; a deterministic script gives byte-identical outputs, on its own target and on another."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.config import Settings
from airflow_amlrun.environment import PythonSection
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.history import RunNotFoundError
from airflow_amlrun.run import rerun
from airflow_amlrun.snapshot import BlobMissingError
from airflow_amlrun.targets import registry
from airflow_amlrun.targets.local import LocalTarget
from tests.conftest import write_script

pytest_plugins = ["tests.integration.docker_engine"]

SCRIPT = """
    import argparse, hashlib, os
    from importlib.metadata import version
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    data = open("data/input.txt", "rb").read()
    weights = hashlib.sha256(data + str(args.seed).encode() + os.environ["MODE"].encode()).digest() * 1000
    os.makedirs("outputs", exist_ok=True)
    open("outputs/model.bin", "wb").write(weights)
    open("outputs/info.txt", "w").write(f"tomli-w {version('tomli-w')} mode {os.environ['MODE']}\\n")
    print("trained with tomli-w", version("tomli-w"))
"""


def output_hashes(outputs_uri: str | None) -> dict[str, str]:
    assert outputs_uri is not None
    root = Path(outputs_uri)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def original(amlrun_home: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A completed run with a managed environment (version 1), arguments, a variable and a data file."""
    source = tmp_path / "src"
    write_script(source, "train.py", SCRIPT)
    (source / "data").mkdir()
    (source / "data" / "input.txt").write_text("the training data\n")
    ws = Workspace.get()
    environment = Environment("rerun-env", python=PythonSection(pip_requirements=["tomli-w==1.0.0"]))
    config = ScriptRunConfig(
        source,
        script="train.py",
        arguments=["--seed", 7],
        environment=environment,
        environment_variables={"MODE": "full"},
    )
    record = Experiment(ws, "reruns").submit(config).wait_for_completion(show_output=False)
    assert record.status == "Completed", record.error
    assert record.environment is not None and record.environment["version"] == "1"
    # What a re-run must not pick up: the live tree changed, and a newer environment version registered.
    (source / "train.py").write_text("raise SystemExit('the live tree was used, not the snapshot')\n")
    Environment("rerun-env", python=PythonSection(pip_requirements=["tomli-w==1.1.0"])).register(ws)
    return ws, record


def test_a_rerun_from_the_command_line_repeats_the_run_byte_for_byte(original) -> None:  # type: ignore[no-untyped-def]
    ws, first = original
    done = subprocess.run(
        [str(Path(sys.executable).parent / "amlrun"), "rerun", first.id],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trained with tomli-w 1.0.0" in done.stdout
    runs = [r for r in ws.list_runs(experiment="reruns") if r.id != first.id]
    assert len(runs) == 1
    second = runs[0]
    assert f"Run {second.id} re-runs {first.id}" in done.stdout
    assert second.status == "Completed"
    assert second.rerun_of == first.id
    assert second.snapshot_id == first.snapshot_id
    assert second.arguments == first.arguments == ["--seed", "7"]
    assert second.environment["version"] == "1"
    assert second.environment["build_key"] == first.environment["build_key"]
    assert second.git == first.git
    assert second.config["source_directory"] == first.config["source_directory"]
    assert output_hashes(second.outputs_uri) == output_hashes(first.outputs_uri)
    assert (Path(second.outputs_uri) / "info.txt").read_text() == "tomli-w 1.0.0 mode full\n"


def test_a_rerun_on_another_target_gives_the_same_outputs(original, docker_home) -> None:  # type: ignore[no-untyped-def]
    ws, first = original
    second = rerun(ws, first.id, compute_target="docker", tags={"why": "portability"}).wait_for_completion(
        show_output=False
    )
    assert second.status == "Completed", second.error
    assert (second.target, second.rerun_of, second.tags) == ("docker", first.id, {"why": "portability"})
    assert second.environment["version"] == "1"
    assert output_hashes(second.outputs_uri) == output_hashes(first.outputs_uri)
    # A re-run of the re-run goes back to the same code and config, on the target it names.
    third = rerun(ws, second.id, compute_target="local").wait_for_completion(show_output=False)
    assert third.rerun_of == second.id
    assert output_hashes(third.outputs_uri) == output_hashes(first.outputs_uri)


def test_runs_that_cannot_be_repeated_fail_before_anything_is_recorded(original) -> None:  # type: ignore[no-untyped-def]
    ws, first = original
    with pytest.raises(RunNotFoundError, match=r"no-such-run.*amlrun runs list"):
        rerun(ws, "no-such-run")
    # A run recorded before configs were kept.
    ws.history.update_run(first.id, config=None)
    with pytest.raises(ConfigurationError, match=rf"Run {first.id} cannot be re-run.*snapshot restore"):
        rerun(ws, first.id)
    assert len(ws.list_runs(experiment="reruns")) == 1


def test_a_sweep_is_not_rerun_as_one_run_and_the_error_says_how_to_run_it_again(
    amlrun_home, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from airflow_amlrun.hyperdrive import GridParameterSampling, HyperDriveConfig, choice

    write_script(
        tmp_path / "src",
        "train.py",
        "from airflow_amlrun.run_context import Run\nRun.get_context().log('loss', 1.0)\n",
    )
    ws = Workspace.get()
    sweep = Experiment(ws, "reruns").submit(
        HyperDriveConfig(
            run_config=ScriptRunConfig(tmp_path / "src", script="train.py"),
            hyperparameter_sampling=GridParameterSampling({"--alpha": choice(1)}),
            primary_metric_name="loss",
            primary_metric_goal="minimize",
            max_total_runs=1,
        )
    )
    assert sweep.wait_for_completion().status == "Completed"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "amlrun"), "rerun", sweep.id], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert f"Run {sweep.id} is a sweep" in message, message
    assert "`amlrun sweep SWEEP.yaml`" in message and "HyperDriveOperator" in message, message
    assert "snapshot" not in message
    assert len(ws.list_runs(experiment="reruns")) == 2


def test_a_store_that_lost_a_blob_of_the_code_fails_the_rerun_before_recording(original) -> None:  # type: ignore[no-untyped-def]
    ws, first = original
    store = Path(ws.store_url.removeprefix("file://"))
    entry = next(e for e in ws.store.get_manifest(first.snapshot_id).entries if e.path == "data/input.txt")
    blob = next(store.rglob(entry.digest))
    blob.unlink()
    with pytest.raises(BlobMissingError, match="data/input.txt"):
        rerun(ws, first.id)
    assert len(ws.list_runs(experiment="reruns")) == 1


def test_a_bad_target_for_a_rerun_is_named(original) -> None:  # type: ignore[no-untyped-def]
    ws, first = original
    with pytest.raises(ConfigurationError, match="compute_target 'no way'"):
        rerun(ws, first.id, compute_target="no way")
    assert len(ws.list_runs(experiment="reruns")) == 1


class NamedLocalTarget(LocalTarget):
    """The local target, reached through an Airflow connection of its own (as an SSH host would be)."""

    @classmethod
    def from_connection(cls, name: str, conn: Any, settings: Settings, cache_dir: Path) -> NamedLocalTarget:
        return cls(settings, cache_dir, name)


def test_a_connection_named_as_a_sweeps_target_is_refused_before_anything_runs_on_it(  # type: ignore[no-untyped-def]
    original, monkeypatch
) -> None:
    ws, first = original
    # A connection a run could go to, but for its id, which the history gives a sweep's parent run: runs there
    # would be taken for sweeps (refused by rerun, recorded Failed by reconcile).
    monkeypatch.setitem(registry.CONNECTION_KINDS, "amlrun_named_local", f"{__name__}:NamedLocalTarget")
    monkeypatch.setenv("AIRFLOW_CONN_HYPERDRIVE", json.dumps({"conn_type": "amlrun_named_local"}))
    config = ScriptRunConfig(first.config["source_directory"], script="train.py")
    with pytest.raises(ConfigurationError, match="rename the Airflow connection 'hyperdrive'"):
        Experiment(ws, "reruns").submit(replace(config, compute_target="hyperdrive"))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "amlrun"), "rerun", first.id, "--target", "hyperdrive"],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "compute_target 'hyperdrive' is the target the run history records for a sweep" in " ".join(
        done.stderr.split()
    )
    assert len(ws.list_runs(experiment="reruns")) == 1


def test_a_rerun_keeps_a_changed_user_managed_environment_secrets_and_limits(amlrun_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import os
        os.makedirs("outputs", exist_ok=True)
        token = os.environ.get("API_TOKEN")
        open("outputs/flavour.txt", "w").write(f"{os.environ['FLAVOUR']} token={token is not None}")
        print("token is", token)
    """,
    )
    ws = Workspace.get()
    registered = Environment("um", environment_variables={"FLAVOUR": "registered"})
    registered.register(ws)
    changed = Environment.get(ws, "um")
    changed.environment_variables["FLAVOUR"] = "changed"
    config = ScriptRunConfig(
        source,
        script="train.py",
        environment=changed,
        max_run_duration_seconds=120,
        secret_environment_variables={"API_TOKEN": "s3cr3t-value"},
    )
    first = Experiment(ws, "reruns").submit(config).wait_for_completion(show_output=False)
    assert (Path(first.outputs_uri) / "flavour.txt").read_text() == "changed token=True"
    # The run row holds the secret's name, never its value.
    row = json.dumps(first.config)
    assert "s3cr3t-value" not in row and first.config["secret_environment_variable_names"] == ["API_TOKEN"]

    with pytest.raises(ConfigurationError, match=r"secret environment variables API_TOKEN.*--secret NAME"):
        rerun(ws, first.id)
    again = rerun(ws, first.id, secret_environment_variables={"API_TOKEN": "another"}).wait_for_completion(
        show_output=False
    )
    assert (Path(again.outputs_uri) / "flavour.txt").read_text() == "changed token=True"
    assert again.max_run_duration_seconds == 120

    # From the command line, the value comes from the caller's environment and is masked in what it prints.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "amlrun"), "rerun", first.id, "--secret", "API_TOKEN"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "API_TOKEN": "from-the-shell"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "token is ***" in done.stdout and "from-the-shell" not in done.stdout
