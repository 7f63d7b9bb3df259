"""The `amlrun` command line's own reading of its options."""

from __future__ import annotations

import argparse
import errno

import pytest

from airflow_amlrun import cli
from airflow_amlrun.cli import RUN_STATUSES, _line_count, _status, os_error_message
from airflow_amlrun.history import RunStatus


def test_the_cli_names_every_run_status_in_its_order() -> None:
    assert list(RUN_STATUSES) == [status.value for status in RunStatus]


@pytest.mark.parametrize("typed", ["failed", "FAILED", " Failed ", "fAiLeD"])
def test_a_status_is_read_in_any_case(typed: str) -> None:
    assert _status(typed) == RunStatus.FAILED.value


@pytest.mark.parametrize("typed", ["", "fail", "Failed!", "done"])
def test_a_status_that_is_none_names_them_all(typed: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="use one of Queued, .*, Canceled$"):
        _status(typed)


@pytest.mark.parametrize(("typed", "count"), [("0", 0), ("20", 20), ("100000", 100000)])
def test_a_tail_is_a_number_of_lines(typed: str, count: int) -> None:
    assert _line_count(typed) == count


@pytest.mark.parametrize("typed", ["-1", "2.5", "many", ""])
def test_a_tail_that_is_no_number_of_lines_says_how_to_write_one(typed: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"e\.g\. --tail 50"):
        _line_count(typed)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "run.yaml"),
            "No such file or directory: 'run.yaml'",
        ),
        (
            OSError(errno.EXDEV, "Invalid cross-device link", b"a", None, "b"),
            "Invalid cross-device link: 'a' -> 'b'",
        ),
        # Naming no path, it names the command that met it.
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "amlrun runs logs failed: No space left on device (OSError)",
        ),
        (
            PermissionError("the store said no"),
            "amlrun runs logs failed: the store said no (PermissionError)",
        ),
    ],
)
def test_an_error_of_the_system_is_a_line_naming_its_path_or_else_the_command(
    error: OSError, line: str
) -> None:
    assert os_error_message(error, "amlrun runs logs") == line


@pytest.mark.parametrize(
    ("argv", "command"),
    [(["runs", "logs", "exp_1_cafe"], "amlrun runs logs"), (["reconcile"], "amlrun reconcile")],
)
def test_an_error_of_the_system_naming_no_path_names_the_command_that_met_it(
    argv: list[str], command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(args: argparse.Namespace, console: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli.runs, "cmd_runs_logs", full)
    monkeypatch.setattr(cli.reconcile, "cmd_reconcile", full)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {command} failed: No space left on device (OSError)"


def test_a_broken_pipe_that_is_not_standard_output_is_said_not_swallowed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A supervisor or socket that went away mid-command: the user must hear of it (stdout is fine here).
    def broken(args: argparse.Namespace, console: object) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(cli.reconcile, "cmd_reconcile", broken)
    assert cli.main(["reconcile"]) == 2
    assert "Broken pipe" in capsys.readouterr().err


def test_a_sentence_longer_than_the_width_is_printed_whole_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Piped output is 200 columns wide: a sentence naming a long path stays one line, for grep and the like.
    sentence = f"It is followed in the background (its follower's log: /tmp/{'d' * 300}/follower.log)."

    def says(args: argparse.Namespace, console: object) -> int:
        console.print(sentence, highlight=False)  # type: ignore[attr-defined]
        return 0

    monkeypatch.setattr(cli.reconcile, "cmd_reconcile", says)
    assert cli.main(["reconcile"]) == 0
    assert capsys.readouterr().out == sentence + "\n"
