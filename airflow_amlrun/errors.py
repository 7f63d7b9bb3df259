"""Exceptions a user of airflow-amlrun meets; each message names the value at fault and the fix."""

from __future__ import annotations


class AmlRunError(Exception):
    """Base of every error raised by airflow-amlrun."""


class ConfigurationError(AmlRunError, ValueError):
    """A ScriptRunConfig, Environment, Experiment or workspace setting is invalid; nothing has run."""


class UnknownComputeTargetError(ConfigurationError):
    """The compute target names neither a built-in target nor a usable Airflow connection."""


class TargetUnreachableError(AmlRunError):
    """The waiting side lost its compute target for longer than it waits; the run may well go on there.

    The run row is left unfinished, as it was: a retry of the task re-attaches to the run (or records it, if
    it ended meanwhile), and ``amlrun reconcile`` settles it if no retry comes.
    """


class RunFailedError(AmlRunError):
    """A run ended Failed; carries the run id, the reason and the last lines of the script's output."""

    def __init__(self, message: str, *, run_id: str, log_tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.log_tail = list(log_tail or [])


class RunTimeoutError(RunFailedError):
    """A run was stopped because it exceeded max_run_duration_seconds."""


class RunCanceledError(AmlRunError):
    """A run was canceled before it finished."""

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class DownloadError(AmlRunError):
    """Downloading a run's files failed partway; carries the run, the file that failed and where it was going.
    What the download wrote is removed again."""

    def __init__(self, message: str, *, run_id: str, name: str, path: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.name = name
        self.path = path


def shown(value: object, limit: int = 100) -> str:
    """The repr of a value for an error message, cut short when long: a message names a 1 MB value, it does
    not carry it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str | bytes) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"
