"""`amlrun` as a user runs it, against a real embedded workspace: submitting a run from a YAML file (followed
here or in the background), a sweep from a YAML file, models and environments, and --json on the listings."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, Run, ScriptRunConfig, Workspace
from airflow_amlrun.model import Model
from tests.conftest import commit_all, write_script

pytest_plugins = ["tests.integration.docker_engine"]

AMLRUN = str(Path(sys.executable).parent / "amlrun")

TRAIN = """\
import argparse
from airflow_amlrun.run_context import Run

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, default=1.0)
args = parser.parse_args()
run = Run.get_context()
for epoch in range(3):
    print(f"epoch {epoch} alpha {args.alpha}")
    run.log("loss", args.alpha / (epoch + 1), step=epoch)
"""


def amlrun(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AMLRUN, *argv], capture_output=True, text=True, env=os.environ.copy(), timeout=300, cwd=cwd
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def table_rows(printed: str) -> dict[str, str]:
    """The rows of a field/value table as `amlrun` prints it, each value whole (the lines it was wrapped over joined)."""
    rows: dict[str, str] = {}
    field = ""
    for line in printed.splitlines():
        cells = line.split("│")
        if len(cells) != 4:
            continue
        field = cells[1].strip() or field
        rows[field] = f"{rows.get(field, '')} {cells[2].strip()}".strip()
    return rows


@pytest.fixture
def project(amlrun_home: Path, tmp_path: Path) -> Path:
    """A folder with training code in src/ and run files beside it."""
    write_script(tmp_path / "src", "train.py", TRAIN)
    return tmp_path


def test_submit_and_wait_streams_the_output_and_records_what_the_file_says(project):
    run_file = write(
        project / "run.yaml",
        """\
        experiment: cli_submit
        tags: {team: cli}
        display_name: first try
        description: the baseline
        source_directory: src
        script: train.py
        arguments: [--alpha, 0.5]
        """,
    )
    done = amlrun("submit", str(run_file), "--wait", "--json", cwd=project.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line for line in done.stdout.splitlines() if line.startswith("epoch")] == [
        f"epoch {i} alpha 0.5" for i in range(3)
    ]
    # The snapshot's progress bar went to stderr, leaving stdout to the run and its summary.
    assert "Snapshot of" in done.stderr and "1/1 files" in done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["status"] == "Completed" and summary["display_name"] == "first try"
    run = Run.get(Workspace.get(), summary["run_id"])
    assert run.get_tags() == {"team": "cli"} and run.description == "the baseline"
    assert run.get_metrics()["loss"] == [0.5, 0.25, 0.5 / 3]


def test_submit_without_wait_leaves_the_run_to_a_follower_of_its_own(project):
    run_file = write(project / "run.yaml", "source_directory: src\nscript: train.py\n")
    started = amlrun("submit", str(run_file), "--experiment", "cli_background", "--target", "local")
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = started.stdout.split()[1]
    assert "`amlrun runs logs" in started.stdout
    followed = amlrun("runs", "logs", run_id, "--follow")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "epoch 2 alpha 1.0" in followed.stdout
    assert Workspace.get().get_run(run_id).status == "Completed"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "source_directory: src\nscript: train.py\nscirpt: x.py\n",
            r"unknown key\(s\) 'scirpt'; the keys of a run",
        ),
        ("source_directory: src\nscript: train.py\narguments: --alpha 1\n", "arguments must be a list"),
        ("source_directory: src\nscript: [train.py\n", "is not valid YAML; fix it where shown"),
        (
            "source_directory: src\nscript: train.py\nenvironment_file: env.yaml\n",
            "environment_file 'env.yaml' does not exist",
        ),
        ("source_directory: src\nscript: train.py\ntags: [a]\n", "tags must be a mapping"),
        ("source_directory: src\nscript: train.py\n", "names no experiment: give --experiment NAME"),
        (
            f"experiment: named\nsource_directory: src\nscript: train.py\ndisplay_name: {'n' * 300}\n",
            "display_name must be text without NUL bytes, at most 256 characters",
        ),
    ],
)
def test_a_bad_run_file_is_refused_naming_the_key_before_anything_runs(project, text, message):
    run_file = write(project / "run.yaml", text)
    done = amlrun("submit", str(run_file))
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(message, " ".join(done.stderr.split())), done.stderr
    assert Workspace.get().list_runs() == []


def test_a_run_file_names_an_environment_file_beside_it(project):
    write(project / "envs" / "user.yaml", "name: cli-user\npython: {user_managed_dependencies: true}\n")
    run_file = write(
        project / "run.yaml",
        "experiment: cli_env\nsource_directory: src\nscript: train.py\nenvironment_file: envs/user.yaml\n",
    )
    done = amlrun("submit", str(run_file), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    [run] = Workspace.get().list_runs()
    assert run.environment is not None and run.environment["name"] == "cli-user"


def test_a_sweep_file_runs_its_sweep_and_lists_the_runs_best_first(project):
    sweep_file = write(
        project / "sweep.yaml",
        """\
        experiment: cli_sweep
        run_config: {source_directory: src, script: train.py}
        hyperparameter_sampling:
          type: grid
          parameter_space:
            --alpha: {choice: [0.3, 0.1, 0.2]}
        primary_metric_name: loss
        primary_metric_goal: minimize
        max_total_runs: 3
        max_concurrent_runs: 2
        """,
    )
    done = amlrun("sweep", str(sweep_file), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["status"] == "Completed"
    assert [row["hyperparameters"]["--alpha"] for row in result["children"]] == [0.1, 0.2, 0.3]
    table = amlrun("sweep", str(sweep_file), "--experiment", "cli_sweep_2")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "best first (loss, minimize)" in table.stdout and "--alpha 0.1" in table.stdout


def test_show_of_a_sweep_says_what_its_runs_run_and_where_their_logs_are(project):
    sweep_file = write(
        project / "sweep.yaml",
        """\
        experiment: cli_sweep_shown
        run_config: {source_directory: src, script: train.py}
        hyperparameter_sampling: {type: grid, parameter_space: {--alpha: {choice: [0.3, 0.1]}}}
        primary_metric_name: loss
        primary_metric_goal: minimize
        max_total_runs: 2
        max_concurrent_runs: 2
        max_duration_minutes: 30
        """,
    )
    done = amlrun("sweep", str(sweep_file), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_id = json.loads(done.stdout[done.stdout.index("{") :])["sweep_run_id"]
    first, best = Workspace.get().history.child_runs(sweep_id)  # --alpha 0.3, then 0.1: the best

    shown = amlrun("runs", "show", sweep_id)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = table_rows(shown.stdout)
    assert rows["arguments"] == (
        "none of its own: each of its runs gets --alpha <value>, with the values it drew (`amlrun runs show` of "
        "the run shows them)"
    )
    assert rows["search space"] == "--alpha choice(0.3, 0.1)"
    assert rows["sampling"] == "grid"
    assert rows["primary metric"] == "loss, minimize"
    assert rows["early termination"] == "none: every run goes on to its end"
    assert rows["limits"] == "at most 2 runs, 2 at a time, for 30 minutes at most"
    where = (
        "A sweep runs no code of its own, so it has no log: each of its runs has its own. "
        f"`amlrun runs logs {best.id}` prints its best run's, `amlrun runs logs {first.id}` its first run's "
        "(2 runs in all)."
    )
    assert rows["log"] == where
    assert "nothing was collected" not in shown.stdout

    # Its log, asked for, says the same; the best run's is there.
    for asked in (amlrun("runs", "logs", sweep_id), amlrun("runs", "show", sweep_id, "--tail", "5")):
        assert f"Run {sweep_id} is a sweep. {where}" in " ".join((asked.stdout + asked.stderr).split())
        assert "nothing was collected" not in asked.stdout + asked.stderr
    printed = amlrun("runs", "logs", best.id)
    assert printed.returncode == 0, printed.stderr
    assert "epoch 2 alpha 0.1" in printed.stdout


def test_show_of_a_sweep_says_its_runs_record_their_git_state_not_that_it_had_none(project):
    commit = commit_all(project / "src", "tuning", "the alpha sweep")
    sweep_file = write(
        project / "sweep.yaml",
        """\
        experiment: cli_sweep_git
        run_config: {source_directory: src, script: train.py}
        hyperparameter_sampling: {type: grid, parameter_space: {--alpha: {choice: [0.3, 0.1]}}}
        primary_metric_name: loss
        primary_metric_goal: minimize
        max_total_runs: 2
        max_concurrent_runs: 2
        """,
    )
    done = amlrun("sweep", str(sweep_file), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_id = json.loads(done.stdout[done.stdout.index("{") :])["sweep_run_id"]
    first, best = Workspace.get().history.child_runs(sweep_id)  # --alpha 0.3, then 0.1: the best

    shown = amlrun("runs", "show", sweep_id)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert table_rows(shown.stdout)["git"] == (
        "A sweep runs no code of its own, so it has no git state: each of its runs records that of its code; all "
        f"of them ran {commit} on tuning, clean. `amlrun runs show {best.id}` shows its best run's, "
        f"`amlrun runs show {first.id}` its first run's (2 runs in all)."
    )
    assert "not a git checkout" not in shown.stdout

    # The best run's shows it: the commit and branch of the code it ran.
    of_best = amlrun("runs", "show", best.id)
    assert of_best.returncode == 0, of_best.stdout + of_best.stderr
    assert table_rows(of_best.stdout)["git"] == f"{commit} on tuning, clean"


def test_show_json_of_a_sweep_gives_how_it_searched_as_the_runs_api_does(project):
    from airflow_amlrun.plugin.schemas import SweepOut

    sweep_file = write(
        project / "sweep.yaml",
        """\
        experiment: cli_sweep_json
        run_config: {source_directory: src, script: train.py}
        hyperparameter_sampling:
          type: random
          seed: 7
          parameter_space: {--alpha: {uniform: [0.1, 0.3]}}
        policy: {type: bandit, slack_factor: 0.2}
        primary_metric_name: loss
        primary_metric_goal: minimize
        max_total_runs: 2
        max_concurrent_runs: 2
        max_duration_minutes: 30
        """,
    )
    done = amlrun("sweep", str(sweep_file), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_id = json.loads(done.stdout[done.stdout.index("{") :])["sweep_run_id"]

    shown = amlrun("runs", "show", sweep_id, "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    sweep = json.loads(shown.stdout)["sweep"]
    assert sweep == {
        "sampling": "random",
        "seed": 7,
        "parameter_space": {"--alpha": "uniform(0.1, 0.3)"},
        "drawn_arguments": ["--alpha", "<value>"],
        "primary_metric_name": "loss",
        "primary_metric_goal": "minimize",
        "policy": "BanditPolicy(evaluation_interval=1, delay_evaluation=0, slack_factor=0.2)",
        "max_total_runs": 2,
        "max_concurrent_runs": 2,
        "max_duration_minutes": 30,
        # The project is no git checkout: its runs share no git state.
        "git": None,
    }
    # In the shape of GET /api/runs/{id}'s `sweep`, field for field.
    assert SweepOut.model_validate(sweep).model_dump() == sweep

    # Any other run has none, as the API says of it.
    run = Workspace.get().history.child_runs(sweep_id)[0]
    of_run = amlrun("runs", "show", run.id, "--json")
    assert of_run.returncode == 0, of_run.stdout + of_run.stderr
    assert json.loads(of_run.stdout)["sweep"] is None


def test_a_sweep_files_tags_and_names_are_recorded_on_the_sweep(project):
    sweep_file = write(
        project / "sweep.yaml",
        """\
        experiment: cli_sweep_named
        run_config:
          source_directory: src
          script: train.py
          tags: {team: forecasting}
          display_name: alpha, weekly
          description: the learning rate, again
        hyperparameter_sampling: {type: grid, parameter_space: {--alpha: {choice: [0.1]}}}
        primary_metric_name: loss
        primary_metric_goal: minimize
        max_total_runs: 1
        """,
    )
    done = amlrun("sweep", str(sweep_file), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    sweep = Run.get(Workspace.get(), json.loads(done.stdout[done.stdout.index("{") :])["sweep_run_id"])
    assert sweep.get_tags()["team"] == "forecasting"
    assert (sweep.display_name, sweep.description) == ("alpha, weekly", "the learning rate, again")


def test_a_bad_sweep_file_names_the_key(project):
    sweep_file = write(
        project / "sweep.yaml",
        """\
        run_config: {source_directory: src, script: train.py}
        hyperparameter_sampling: {type: random, parameter_space: {--alpha: {uniformm: [0, 1]}}}
        primary_metric_name: loss
        primary_metric_goal: minimize
        max_total_runs: 3
        """,
    )
    done = amlrun("sweep", str(sweep_file), "--experiment", "cli_sweep")
    assert done.returncode == 2
    assert "hyperparameter_sampling.parameter_space['--alpha']: 'uniformm' is not one of choice" in " ".join(
        done.stderr.split()
    )


def test_a_sweep_files_experiment_is_checked_as_a_run_files_is_before_anything_runs(project):
    sweep_file = write(
        project / "sweep.yaml",
        """\
        experiment: the tuning
        run_config: {source_directory: src, script: train.py}
        hyperparameter_sampling: {type: grid, parameter_space: {--alpha: {choice: [0.1]}}}
        primary_metric_name: loss
        primary_metric_goal: minimize
        max_total_runs: 1
        """,
    )
    done = amlrun("sweep", str(sweep_file))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"Sweep file {str(sweep_file)!r}: experiment: Invalid experiment name 'the tuning'" in " ".join(
        done.stderr.split()
    )
    assert Workspace.get().list_runs() == []


def test_models_are_listed_shown_and_downloaded(project, tmp_path):
    write_script(
        project / "model_src",
        "train.py",
        "import os\nos.makedirs('outputs', exist_ok=True)\nopen('outputs/model.txt', 'w').write('w1')\n",
    )
    ws = Workspace.get()
    run = Experiment(ws, "cli_models").submit(ScriptRunConfig(project / "model_src", script="train.py"))
    run.wait_for_completion(show_output=False)
    Model.register(ws, run.id, "churn", "outputs/model.txt", tags={"stage": "test"}).set_label("production")
    listed = amlrun("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [model] = json.loads(listed.stdout)
    assert (model["name"], model["version"], model["labels"], model["run_id"]) == (
        "churn",
        1,
        ["production"],
        run.id,
    )
    shown = amlrun("models", "show", "churn", "--label", "production")
    assert shown.returncode == 0 and "stage=test" in shown.stdout and run.id in shown.stdout
    got = amlrun("models", "download", "churn", str(tmp_path / "serving"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "serving" / "model.txt").read_text() == "w1"
    assert "Writing 1 files" in got.stderr
    missing = amlrun("models", "show", "churn", "--version", "7")
    assert missing.returncode == 2 and "version 7" in missing.stderr


def test_environments_are_listed_shown_and_built(project):
    from airflow_amlrun.environment import Environment, PythonSection

    ws = Workspace.get()
    Environment(name="cli-tools", python=PythonSection(pip_requirements=["tomli-w==1.0.0"])).register(ws)
    Environment.set_label(ws, "cli-tools", "1", "production")
    listed = amlrun("envs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    kinds = {env["name"]: env["kind"] for env in json.loads(listed.stdout)}
    assert kinds["cli-tools"] == "registered" and kinds["amlrun-pytorch"] == "curated"
    shown = amlrun("envs", "show", "cli-tools:1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "tomli-w==1.0.0" in json.loads(shown.stdout)["lock"]
    assert json.loads(shown.stdout)["labels"] == {"production": "1"}
    assert "production" in amlrun("envs", "show", "cli-tools").stdout
    built = amlrun("envs", "build", "cli-tools")
    assert built.returncode == 0, built.stdout + built.stderr
    python = built.stdout.split("built for local runs: ")[1].strip()
    check = subprocess.run(
        [python, "-c", "import tomli_w; print(tomli_w.__name__)"], capture_output=True, text=True
    )
    assert check.stdout.strip() == "tomli_w"
    assert "Building environment cli-tools version 1" in built.stderr
    unknown = amlrun("envs", "show", "cli-tols")
    assert unknown.returncode == 2 and "cli-tols" in unknown.stderr


def test_every_listing_takes_json(project):
    run = Experiment(Workspace.get(), "cli_json").submit(ScriptRunConfig(project / "src", script="train.py"))
    run.wait_for_completion(show_output=False)
    for argv in (["runs", "list"], ["experiments"], ["models", "list"], ["envs", "list"], ["reconcile"]):
        done = amlrun(*argv, "--json")
        assert done.returncode == 0, (argv, done.stderr)
        assert isinstance(json.loads(done.stdout), list), argv
    assert json.loads(amlrun("experiments", "--json").stdout)[0]["name"] == "cli_json"


def test_an_environment_is_built_into_a_docker_image_ahead_of_its_runs(project, docker_home):
    from airflow_amlrun.environment import Environment, PythonSection

    # A variable of its own makes its build key (and image) new to the daemon.
    Environment(
        name="cli-image",
        python=PythonSection(pip_requirements=["tomli-w==1.0.0"]),
        environment_variables={"CLI_TEST": secrets.token_hex(8)},
    ).register(Workspace.get())
    built = amlrun("envs", "build", "cli-image:1", "--target", "docker")
    assert built.returncode == 0, built.stdout + built.stderr
    image = built.stdout.split("image ")[-1].strip()
    try:
        assert docker_home.inspect_image(image)["Id"]
        assert "Building the image of environment cli-image version 1" in built.stderr
        again = amlrun("envs", "build", "cli-image:1", "--target", "docker")
        assert again.returncode == 0 and again.stdout.split("image ")[-1].strip() == image
        assert "Building the image" not in again.stderr  # built once, by its hash
    finally:
        docker_home.remove_image(image, force=True)
