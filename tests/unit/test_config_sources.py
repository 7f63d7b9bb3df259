"""The [amlrun] settings: read from the environment and airflow.cfg, the same with or without Airflow loaded."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from airflow_amlrun import config
from airflow_amlrun.config import OPTIONS, connection_may_be_defined, load_settings
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.get_provider_info import get_provider_info
from airflow_amlrun.workspace import Workspace


@pytest.fixture
def airflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An AIRFLOW_HOME for a plain process: one that has not loaded Airflow, as this test process may have
    (tests/integration/test_config_processes.py runs both for real)."""
    monkeypatch.setattr(config, "airflow_loaded", lambda: False)
    home = tmp_path / "airflow"
    home.mkdir()
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.delenv("AIRFLOW_CONFIG", raising=False)
    for name in list(os.environ):
        if name.startswith(
            ("AIRFLOW__AMLRUN__", "AIRFLOW__SECRETS__", "AIRFLOW__WORKERS__", "AIRFLOW_CONN_")
        ):
            monkeypatch.delenv(name)
    return home


def write_cfg(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


def test_a_plain_script_reads_the_amlrun_section_of_airflow_cfg(airflow_home: Path) -> None:
    write_cfg(
        airflow_home / "airflow.cfg",
        """
        [core]
        dags_folder = /nowhere
        [amlrun]
        home = ~/amlrun-home
        snapshot_max_files = 17
        cleanup = never
        """,
    )
    settings = load_settings()
    assert settings.home == Path.home() / "amlrun-home"
    assert settings.local_runs_dir == Path.home() / "amlrun-home" / "runs"
    assert settings.snapshot_max_files == 17
    assert settings.cleanup == "never"
    assert settings.poll_interval_seconds == 0.1  # the default


def test_a_variable_wins_over_airflow_cfg_and_airflow_config_names_the_file(
    airflow_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "etc" / "my-airflow.cfg"
    elsewhere.parent.mkdir()
    write_cfg(elsewhere, "[amlrun]\nsnapshot_max_size_mb = 2.5\ncleanup = always\n")
    write_cfg(airflow_home / "airflow.cfg", "[amlrun]\ncleanup = never\n")
    monkeypatch.setenv("AIRFLOW_CONFIG", str(elsewhere))
    monkeypatch.setenv("AIRFLOW__AMLRUN__CLEANUP", "on_success")
    settings = load_settings()
    assert settings.snapshot_max_bytes == 2_500_000
    assert settings.cleanup == "on_success"


def test_a_number_that_is_not_one_is_named_with_where_to_fix_it(
    airflow_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__AMLRUN__SNAPSHOT_MAX_FILES", "2k")
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert "snapshot_max_files = '2k' is not an integer" in str(raised.value)
    assert "AIRFLOW__AMLRUN__SNAPSHOT_MAX_FILES (default 2000)" in str(raised.value)


def test_a_connection_is_looked_for_only_where_airflow_could_hold_one(
    airflow_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not connection_may_be_defined("amlrun_default")
    monkeypatch.setenv("AIRFLOW_CONN_AMLRUN_DEFAULT", "amlrun://?database_url=sqlite://&store_url=/tmp/s")
    assert connection_may_be_defined("amlrun_default")
    assert not connection_may_be_defined("other")
    write_cfg(airflow_home / "airflow.cfg", "[secrets]\nbackend = my.vault.Backend\n")
    assert connection_may_be_defined("other")


def test_provider_info_declares_each_option_with_its_type() -> None:
    options = get_provider_info()["config"]["amlrun"]["options"]
    assert options["snapshot_max_files"]["type"] == "integer"
    assert options["poll_interval_seconds"]["type"] == "float"
    assert options["workspace_conn_id"]["type"] == "string"
    for name, option in OPTIONS.items():
        # Every default is valid for its declared type, as Airflow's config tooling reads it.
        if option.type == "integer":
            int(option.default)
        elif option.type == "float":
            float(option.default)
        assert options[name]["default"] == option.default


def test_a_plain_script_finds_a_workspace_connection_set_in_the_environment(
    airflow_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where no connection can exist, a plain script skips asking Airflow (airflow_home makes this process one
    # that has not loaded Airflow): a connection in the environment must still be found.
    extra = {"database_url": f"sqlite:///{tmp_path / 'h.db'}", "store_url": str(tmp_path / "shared-store")}
    monkeypatch.setenv("AIRFLOW_CONN_AMLRUN_DEFAULT", json.dumps({"conn_type": "amlrun", "extra": extra}))
    workspace = Workspace.get()
    assert (workspace.name, workspace.store_url) == ("amlrun_default", str(tmp_path / "shared-store"))


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("load_examples = False\n[amlrun]\nhome = /srv/amlrun-team\n", "no section headers"),
        ("[amlrun]\nhome = /srv/%(missing)s\n", "missing"),
    ],
)
def test_an_airflow_cfg_that_airflow_would_refuse_is_refused_naming_it_not_read_as_defaults(
    airflow_home: Path, text: str, said: str
) -> None:
    # With defaults instead, a plain script would record its runs in another history than the tasks'.
    write_cfg(airflow_home / "airflow.cfg", text)

    with pytest.raises(ConfigurationError) as raised:
        load_settings()

    assert str(airflow_home / "airflow.cfg") in str(raised.value)
    assert said in str(raised.value)
    assert "AIRFLOW_CONFIG" in str(raised.value)
