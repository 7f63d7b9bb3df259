"""The `[amlrun]` options as a user writes them (strings in airflow.cfg or AIRFLOW__AMLRUN__* variables), read
into the typed settings the package uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.config import OPTIONS, load_settings, parse_flag, url_secrets
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.workspace import Workspace

# option -> (its value as written, the Settings field it sets, the value read)
WRITTEN_AND_READ: dict[str, tuple[str, str, object]] = {
    "workspace_conn_id": ("team_workspace", "workspace_conn_id", "team_workspace"),
    "home": ("/data/amlrun", "home", Path("/data/amlrun")),
    "local_runs_dir": ("/scratch/runs", "local_runs_dir", Path("/scratch/runs")),
    "cleanup": ("always", "cleanup", "always"),
    "snapshot_max_size_mb": ("2.5", "snapshot_max_bytes", 2_500_000),
    "snapshot_max_files": ("50000", "snapshot_max_files", 50_000),
    "poll_interval_seconds": ("0.25", "poll_interval_seconds", 0.25),
    "docker_default_image": (
        "registry.example.com/base:py3.12",
        "docker_default_image",
        "registry.example.com/base:py3.12",
    ),
    "docker_default_image_base": ("python:3.12-slim", "docker_default_image_base", "python:3.12-slim"),
    "reconcile_after_seconds": ("90", "reconcile_after_seconds", 90.0),
}


def test_every_published_option_is_covered_here():
    # A new option gets a line in WRITTEN_AND_READ (and in the bad values below when it can be wrong).
    assert set(WRITTEN_AND_READ) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(WRITTEN_AND_READ))
def test_each_option_is_read_from_its_written_form_into_its_type(amlrun_options, name):
    written, field, read = WRITTEN_AND_READ[name]
    amlrun_options(**{name: written})

    value = getattr(load_settings(), field)

    assert value == read
    assert type(value) is type(read)


def test_the_published_defaults_give_the_settings_a_user_wants(amlrun_options, tmp_path):
    amlrun_options()

    settings = load_settings()

    assert settings.workspace_conn_id == "amlrun_default"
    assert settings.home == tmp_path / "airflow" / "amlrun"
    assert settings.local_runs_dir == tmp_path / "airflow" / "amlrun" / "runs"
    assert settings.cleanup == "on_success"
    assert settings.snapshot_max_bytes == 300_000_000
    assert settings.snapshot_max_files == 2000
    assert settings.poll_interval_seconds == 0.1
    assert settings.docker_default_image == "amlrun-base:py3.11"
    assert settings.docker_default_image_base == "python:3.11-slim"
    assert settings.reconcile_after_seconds == 600.0


def test_folders_follow_home_and_a_tilde_is_the_users_home(amlrun_options, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    amlrun_options(home="~/aml")
    assert load_settings().home == tmp_path / "me" / "aml"
    assert load_settings().local_runs_dir == tmp_path / "me" / "aml" / "runs"

    amlrun_options(home="/srv/aml", local_runs_dir="~/runs")
    assert load_settings().local_runs_dir == tmp_path / "me" / "runs"


def test_an_empty_default_image_means_the_built_in_one_and_an_empty_image_base_means_never_build(
    amlrun_options,
):
    amlrun_options(docker_default_image="", docker_default_image_base="")

    settings = load_settings()

    assert settings.docker_default_image == "amlrun-base:py3.11"
    assert settings.docker_default_image_base == ""


@pytest.mark.parametrize(
    ("name", "written", "said"),
    [
        ("cleanup", "sometimes", "[amlrun] cleanup = 'sometimes' is not one of never, on_success, always"),
        ("cleanup", "On_Success", "[amlrun] cleanup = 'On_Success' is not one of"),
        ("reconcile_after_seconds", "0", "[amlrun] reconcile_after_seconds = 0 must be more than 0 seconds"),
        (
            "reconcile_after_seconds",
            "-5",
            "[amlrun] reconcile_after_seconds = -5 must be more than 0 seconds",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_the_option_and_where_to_set_it(amlrun_options, name, written, said):
    amlrun_options(**{name: written})

    with pytest.raises(ConfigurationError) as raised:
        load_settings()

    assert said in str(raised.value)
    assert f"AIRFLOW__AMLRUN__{name.upper()}" in str(raised.value)


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("snapshot_max_size_mb", "lots"),
        ("snapshot_max_files", "1.5k"),
        ("poll_interval_seconds", "fast"),
        ("reconcile_after_seconds", "ten minutes"),
    ],
)
def test_a_number_option_that_is_not_a_number_is_refused_naming_the_option(amlrun_options, name, written):
    amlrun_options(**{name: written})

    with pytest.raises(ConfigurationError) as raised:
        load_settings()

    assert f"[amlrun] {name} = {written!r}" in str(raised.value)
    assert f"AIRFLOW__AMLRUN__{name.upper()}" in str(raised.value)


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def _as_a_user_might_write(words: tuple[str, ...]) -> st.SearchStrategy[str]:
    """One of the words, in any case, with spaces around it."""
    spaces = st.text(alphabet=" \t\n", max_size=2)
    word = st.sampled_from(words).flatmap(
        lambda w: st.lists(st.booleans(), min_size=len(w), max_size=len(w)).map(
            lambda upper: "".join(c.upper() if u else c for c, u in zip(w, upper, strict=True))
        )
    )
    return st.tuples(spaces, word, spaces).map("".join)


@given(_as_a_user_might_write(TRUE_WORDS))
def test_a_flag_written_as_yes_in_any_spelling_is_true(text):
    assert parse_flag(text, "[amlrun] some_flag") is True


@given(_as_a_user_might_write(FALSE_WORDS))
def test_a_flag_written_as_no_in_any_spelling_or_left_empty_is_false(text):
    assert parse_flag(text, "[amlrun] some_flag") is False


def test_a_flag_given_as_a_json_value_keeps_its_meaning():
    assert parse_flag(True, "extra") is True and parse_flag(False, "extra") is False
    assert parse_flag(1, "extra") is True and parse_flag(0, "extra") is False


@given(
    st.one_of(st.text(max_size=8), st.integers(), st.floats(allow_nan=False)).filter(
        lambda v: str(v).strip().lower() not in TRUE_WORDS + FALSE_WORDS
    )
)
def test_anything_else_is_refused_naming_where_it_was_written_and_the_fix(value):
    with pytest.raises(ConfigurationError) as raised:
        parse_flag(value, "connection 'gpu_box': auto_remove")

    assert str(raised.value) == (
        f"connection 'gpu_box': auto_remove = {value!r} is not a boolean; write true or false."
    )


def test_the_secrets_a_url_carries_are_found_as_written_and_decoded() -> None:
    assert url_secrets("postgresql://u:p%40ss@db/x?password=a%2Fb&sslmode=require&token=t0k") == [
        "p%40ss",
        "a%2Fb",
        "p@ss",
        "a/b",
        "t0k",
    ]  # the longest first: a message masks them in this order, so no part of one is left showing
    assert url_secrets("postgresql://u:p@ss@db/x") == ["p@ss"]
    assert url_secrets("sqlite:////data/history.db") == []


def test_a_workspace_names_every_secret_it_is_opened_with_for_the_task_log_to_mask() -> None:
    ws = Workspace(
        "postgresql://amlrun@db/amlrun?password=pw-9x",
        "s3://bucket/amlrun",
        storage_options={"secret": "s3-secret", "key": "s3-key", "endpoint_url": "http://minio:9000"},
    )
    assert ws.credentials() == ["pw-9x", "s3-key", "s3-secret"]
