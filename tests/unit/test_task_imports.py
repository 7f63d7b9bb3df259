"""What a process imports to submit a run without Airflow (a plain script, the CLI): its start-up is mostly imports.

The run history uses SQLAlchemy Core alone. Its ORM (``sqlalchemy.orm``) costs about 0.2 s to import, and more to
map classes and compile their statements: no module such a process loads may import it. (An Airflow task imports
the ORM for Airflow's own models anyway.) A fresh interpreter sees what a module imports, whatever this test
process imported before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import airflow_amlrun

# The package's own folder goes first on the child's path: it imports the code under test.
ROOT = Path(airflow_amlrun.__file__).parent.parent

# Runs in the child before anything else: notes who imports sqlalchemy.orm first, then lets the import go on.
WATCH = textwrap.dedent(
    """
    import json, sys, traceback

    found = {}

    def _module_of(filename):
        for name, module in list(sys.modules.items()):
            if getattr(module, "__file__", None) == filename:
                return name
        return filename

    class _Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "sqlalchemy.orm" and not found:
                frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
                importer = frames[-1]
                found["by"] = f"{_module_of(importer.filename)} (line {importer.lineno})"
                own = [_module_of(f.filename) for f in frames if "/airflow_amlrun/" in f.filename]
                found["through"] = list(dict.fromkeys(own))
            return None

    sys.meta_path.insert(0, _Watch())
    """
)


def _orm_importer(code: str) -> dict[str, object]:
    """Run `code` in a fresh interpreter: who imported sqlalchemy.orm there ({} if nothing did)."""
    script = WATCH + textwrap.dedent(code) + "\nprint(json.dumps(found))\n"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def _said(found: dict[str, object]) -> str:
    through = found.get("through") or []
    return f"sqlalchemy.orm is imported by {found.get('by')}" + (
        f", loaded through {' -> '.join(map(str, through))}" if through else ""
    )


def test_the_modules_a_task_loads_to_submit_a_run_import_no_orm() -> None:
    found = _orm_importer(
        "import airflow_amlrun.run.script_run, airflow_amlrun.experiment, airflow_amlrun.workspace"
    )
    assert found == {}, _said(found)


def test_recording_a_run_in_the_history_imports_no_orm(tmp_path: Path) -> None:
    # A task records its run, metrics, outcome and a model in a history migrated before (by an earlier task).
    url = f"sqlite:///{tmp_path / 'history.db'}"
    from airflow_amlrun.history import RunHistory

    RunHistory(url).dispose()
    found = _orm_importer(
        f"""
        from airflow_amlrun.history import MetricPoint, RunBookkeeper, RunHistory, RunStatus
        from airflow_amlrun.history import model_registry
        from airflow_amlrun.environment import registry

        history = RunHistory({url!r})
        history.create_run(run_id="r1", experiment="exp", target="local")
        keeper = RunBookkeeper(history, "r1")
        keeper.update(status=RunStatus.RUNNING)
        keeper.add_metrics([MetricPoint("loss", 0.5, seq=0)])
        keeper.finish(status=RunStatus.COMPLETED)
        model_registry.add_version(
            history, name="m", run_id="r1", path="outputs/m", snapshot_id="s", tags={{}}, properties={{}}, run_info={{}}
        )
        assert history.get_run("r1").metrics == {{"loss": 0.5}}
        """
    )
    assert found == {}, _said(found)
