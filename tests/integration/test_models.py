"""Registered models: versions made from a run's outputs (from the script, or from the run afterwards),
stored content-addressed, with tags, properties, labels that move, and the run they came from on record."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.model import Model, ModelNotFoundError
from tests.conftest import write_script

TRAIN = """
    import os, sys
    from airflow_amlrun.run_context import Run
    run = Run.get_context()
    alpha = float(sys.argv[1])
    os.makedirs("outputs/tokenizer", exist_ok=True)
    open("outputs/model.pkl", "wb").write(b"weights for alpha %f" % alpha)
    open("outputs/tokenizer/vocab.txt", "w").write("a b c\\n")
    open("outputs/tokenizer/merges.txt", "w").write("ab\\n")
    run.log("rmse", 10 * alpha)
    if len(sys.argv) > 2:
        run.register_model("ridge", "outputs/model.pkl", tags={"alpha": alpha}, properties={"framework": "sklearn"})
    if len(sys.argv) > 3:
        raise SystemExit("failing after asking for a model")
"""


def train(source: Path, *arguments: str) -> object:
    config = ScriptRunConfig(source, script="train.py", arguments=list(arguments))
    return Experiment(Workspace.get(), "models").submit(config)


def blob_count(amlrun_home: Path) -> int:
    return sum(1 for p in (amlrun_home / "store" / "blobs").rglob("*") if p.is_file())


@pytest.fixture
def source(amlrun_home: Path, tmp_path: Path) -> Path:
    write_script(tmp_path / "src", "train.py", TRAIN)
    return tmp_path / "src"


def test_a_script_registers_its_model_once_the_run_completed(source: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    ws = Workspace.get()
    record = train(source, "0.1", "register").wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    assert record.status == "Completed"

    model = Model(ws, "ridge")
    assert (model.version, model.run_id, model.path) == (1, record.id, "outputs/model.pkl")
    assert model.tags == {"alpha": "0.1"}
    assert model.properties == {"framework": "sklearn"}
    # The run as it was: its metrics, code snapshot, environment and git.
    assert model.run_info["metrics"] == {"rmse": 1.0}
    assert model.run_info["snapshot_id"] == record.snapshot_id
    assert model.run_info["environment"] == record.environment
    assert model.run_info["experiment"] == "models"

    downloaded = Path(model.download(tmp_path / "serving"))
    assert downloaded == tmp_path / "serving" / "model.pkl"
    assert downloaded.read_bytes() == (Path(record.outputs_uri) / "model.pkl").read_bytes()


def test_a_failed_run_registers_nothing_and_says_so(source: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    ws = Workspace.get()
    with caplog.at_level("WARNING", logger="airflow_amlrun.run"):
        record = train(source, "0.3", "register", "fail").wait_for_completion(  # type: ignore[attr-defined]
            show_output=False, raise_on_error=False
        )
    assert record.status == "Failed"
    assert f"Run {record.id}: model 'ridge' was not registered: the run is Failed." in caplog.text
    with pytest.raises(
        ModelNotFoundError, match=r"Model 'ridge' has no version in this workspace\. Register one"
    ):
        Model(ws, "ridge")
    with pytest.raises(ConfigurationError, match=rf"Run {record.id} is Failed: only a Completed run"):
        Model.register(ws, record.id, "ridge", "outputs/model.pkl")


def test_versions_labels_and_tags_from_runs_after_they_ended(
    source: Path, amlrun_home: Path, tmp_path: Path
) -> None:
    ws = Workspace.get()
    first = train(source, "0.1")
    first.wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    v1 = first.register_model("ridge", "model.pkl")  # type: ignore[attr-defined]
    second = train(source, "0.2")
    second.wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    v2 = Model.register(ws, second.id, "ridge", "outputs/model.pkl", tags={"stage": "candidate"})  # type: ignore[attr-defined]
    tokenizer = Model.register(ws, second.id, "tokenizer", "outputs/tokenizer/")  # type: ignore[attr-defined]
    assert (v1.version, v2.version, tokenizer.version) == (1, 2, 1)

    assert [m.version for m in Model.list(ws, "ridge")] == [2, 1]
    assert [(m.name, m.version) for m in Model.list(ws)] == [("ridge", 2), ("tokenizer", 1)]
    assert Model(ws, "ridge", version=1).run_id == first.id  # type: ignore[attr-defined]

    v1.set_label("production")
    assert Model(ws, "ridge", label="production").version == 1
    v2.set_label("production")  # the label moves
    assert Model(ws, "ridge", label="production").version == 2
    assert Model(ws, "ridge", version=1).labels == []
    with pytest.raises(ModelNotFoundError, match=r"no label 'staging' \(labels: production\)"):
        Model(ws, "ridge", label="staging")
    with pytest.raises(ModelNotFoundError, match=r"no version 7 in this workspace \(versions: 1, 2\)"):
        Model(ws, "ridge", version=7)

    v2.add_tags({"stage": "live", "owner": "vision"})
    v2.remove_tags(["owner"])
    assert Model(ws, "ridge", version=2).tags == {"stage": "live"}

    # A folder keeps its name and its files; the same bytes registered again add no blob to the store.
    folder = Path(tokenizer.download(tmp_path / "tok"))
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.txt"]
    before = blob_count(amlrun_home)
    again = Model.register(ws, second.id, "tokenizer", "outputs/tokenizer")  # type: ignore[attr-defined]
    assert again.version == 2 and again.snapshot_id == tokenizer.snapshot_id
    assert blob_count(amlrun_home) == before


def test_a_model_path_outside_the_outputs_or_missing_is_refused(source: Path) -> None:
    ws = Workspace.get()
    run = train(source, "0.1")
    run.wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    with pytest.raises(
        ConfigurationError, match=r"no output 'outputs/nope.pkl'\. Its outputs: .*outputs/model\.pkl"
    ):
        Model.register(ws, run.id, "ridge", "outputs/nope.pkl")  # type: ignore[attr-defined]
    for bad in ("../history.db", "/etc/passwd", "outputs", ""):
        with pytest.raises(ConfigurationError, match="model_path"):
            Model.register(ws, run.id, "ridge", bad)  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="Model name"):
        Model.register(ws, run.id, "no spaces allowed", "outputs/model.pkl")  # type: ignore[attr-defined]
    with pytest.raises(ModelNotFoundError):
        Model(ws, "ridge")


def test_a_downloaded_model_is_checked_against_its_hash(
    source: Path, amlrun_home: Path, tmp_path: Path
) -> None:
    from airflow_amlrun.snapshot import BlobCorruptError

    ws = Workspace.get()
    run = train(source, "0.1")
    run.wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    model = run.register_model("ridge", "outputs/model.pkl")  # type: ignore[attr-defined]
    entry = ws.store.get_manifest(model.snapshot_id).entries[0]
    blob = next((amlrun_home / "store" / "blobs").rglob(entry.digest))
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    with pytest.raises(BlobCorruptError, match="model.pkl"):
        model.download(tmp_path / "out")
    # Nothing of it is left to be taken for the model, nor to stop the next download.
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_dag_task_registers_what_its_script_asks_for(source: Path, run_dag) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import dag_source

    result = run_dag(dag_source(source, arguments=["0.5", "register"], experiment="models"))
    assert result.state == "success", result.log
    run_id = result.xcoms["train"]["run_id"]
    assert f"Run {run_id}: registered model ridge version 1 from outputs/model.pkl." in result.log
    model = Model(Workspace.get(), "ridge")
    assert (model.run_id, model.tags, model.run_info["metrics"]) == (run_id, {"alpha": "0.5"}, {"rmse": 5.0})


def test_a_promotion_without_the_metric_or_with_a_bad_goal_is_refused(source: Path) -> None:
    from airflow_amlrun.model import promote_if_better

    ws = Workspace.get()
    run = train(source, "0.1")
    run.wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    with pytest.raises(
        ConfigurationError, match=r"has no finite numeric metric 'mse' to compare \(its metrics: rmse\)"
    ):
        promote_if_better(ws, run.id, "ridge", "outputs/model.pkl", metric="mse")  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="goal='up' must be 'minimize' or 'maximize'"):
        promote_if_better(ws, run.id, "ridge", "outputs/model.pkl", metric="rmse", goal="up")  # type: ignore[attr-defined]
    with pytest.raises(ModelNotFoundError):
        Model(ws, "ridge")
    # A tie keeps the labelled version.
    first = promote_if_better(ws, run.id, "ridge", "outputs/model.pkl", metric="rmse", goal="maximize")  # type: ignore[attr-defined]
    again = promote_if_better(ws, run.id, "ridge", "outputs/model.pkl", metric="rmse", goal="maximize")  # type: ignore[attr-defined]
    assert (first.promoted, again.promoted, again.version) == (True, False, 1)


def test_a_request_the_follower_cannot_meet_is_said_on_the_run(source: Path, tmp_path: Path) -> None:
    write_script(
        source,
        "train.py",
        """
        from airflow_amlrun.run_context import Run
        Run.get_context().register_model("ridge", "outputs/never-written.pkl")
    """,
    )
    record = train(source).wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    assert record.status == "Completed"
    assert record.tags["model_registration"].startswith(
        "ridge from outputs/never-written.pkl: not registered"
    )
    with pytest.raises(ModelNotFoundError):
        Model(Workspace.get(), "ridge")


def test_a_download_never_replaces_what_is_there(source: Path, tmp_path: Path) -> None:
    run = train(source, "0.1")
    run.wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    model = run.register_model("ridge", "outputs/model.pkl")  # type: ignore[attr-defined]
    folder = tmp_path / "serving"
    folder.mkdir()
    (folder / "README").write_text("mine")
    with pytest.raises(Exception, match="not empty"):
        model.download(folder)
    path = Path(model.download(folder, exist_ok=True))
    assert path.read_bytes() == b"weights for alpha 0.100000"
    assert (folder / "README").read_text() == "mine"
    with pytest.raises(ConfigurationError, match="exists already"):
        model.download(folder, exist_ok=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README", "model.pkl"]


def test_a_label_moves_only_from_the_version_a_promotion_compared_with(source: Path) -> None:
    from airflow_amlrun.history import model_registry

    ws = Workspace.get()
    run = train(source, "0.1")
    run.wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    for _ in range(3):
        run.register_model("ridge", "outputs/model.pkl")  # type: ignore[attr-defined]
    assert model_registry.move_label(ws.history, "ridge", "production", 1, expected=None)
    # A second first promotion lost the race: the label exists now.
    assert not model_registry.move_label(ws.history, "ridge", "production", 2, expected=None)
    assert model_registry.move_label(ws.history, "ridge", "production", 2, expected=1)
    # Another promotion that compared with version 1 finds the label moved, and moves nothing.
    assert not model_registry.move_label(ws.history, "ridge", "production", 3, expected=1)
    assert Model(ws, "ridge", label="production").version == 2


def test_a_folder_model_with_a_spoiled_file_leaves_nothing_where_it_was_downloaded(
    source: Path, amlrun_home: Path, tmp_path: Path
) -> None:
    from airflow_amlrun.snapshot import BlobCorruptError

    ws = Workspace.get()
    run = train(source, "0.1")
    run.wait_for_completion(show_output=False)  # type: ignore[attr-defined]
    model = run.register_model("tokenizer", "outputs/tokenizer")  # type: ignore[attr-defined]
    spoiled = next(
        e for e in ws.store.get_manifest(model.snapshot_id).entries if e.path.endswith("vocab.txt")
    )
    blob = next((amlrun_home / "store" / "blobs").rglob(spoiled.digest))
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    for folder, exist_ok in ((tmp_path / "new", False), (tmp_path / "serving", True)):
        folder.mkdir(exist_ok=True)
        if exist_ok:
            (folder / "README").write_text("mine")
        with pytest.raises(BlobCorruptError, match="vocab.txt"):
            model.download(folder, exist_ok=exist_ok)
        assert sorted(p.name for p in folder.iterdir()) == (["README"] if exist_ok else [])
