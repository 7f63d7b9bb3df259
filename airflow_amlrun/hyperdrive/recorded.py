"""A sweep as its parent run's row records it, for a reader: what the run page and `amlrun runs show` say of it.

A sweep's parent run runs nothing itself: the row's script and arguments are those every run of the sweep
starts from, each run adding the values it drew, and its config holds how the sweep searched (HyperDriveConfig
``to_dict``). Pure reading of that row: nothing is asked of the history or of a target here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_amlrun.hyperdrive.parameters import argument_words
from airflow_amlrun.runconfig import SWEEP_TARGET

if TYPE_CHECKING:
    from airflow_amlrun.history import RunRecord

# What stands in a run's command line for the value it draws of a parameter.
DRAWN = "<value>"


@dataclass(frozen=True)
class RecordedSweep:
    """How a sweep searched, as its parent run recorded it.

    :param sampling: ``grid``, ``random`` or ``bayesian``.
    :param seed: the seed of random or Bayesian sampling, if one was given.
    :param parameter_space: each parameter and its values, as Python writes the expression (``choice(0.1, 0.5)``).
    :param drawn_arguments: the arguments each run adds to the recorded ones, its values left as ``DRAWN``.
    :param policy: the early termination policy as Python writes it; None when every run goes on to its end.
    :param git: the git state every one of its runs recorded of its code, when they all recorded the same (see
        ``shared_git``); None otherwise.
    """

    sampling: str
    seed: int | None
    parameter_space: dict[str, str]
    drawn_arguments: list[str]
    primary_metric_name: str
    primary_metric_goal: str
    policy: str | None
    max_total_runs: int
    max_concurrent_runs: int | None
    max_duration_minutes: float | None
    git: dict[str, Any] | None = None

    @classmethod
    def of(cls, record: RunRecord, git_states: Sequence[dict[str, Any] | None] = ()) -> RecordedSweep | None:
        """The sweep `record` is the parent run of; None for any other run, or a sweep whose row holds no config.

        :param git_states: the git state each of the sweep's runs recorded, for the one they share.
        """
        recorded = (record.config or {}).get("hyperdrive") if record.target == SWEEP_TARGET else None
        if not isinstance(recorded, Mapping):
            return None
        sampling = recorded.get("sampling") or {}
        space = {str(name): expression_text(e) for name, e in (sampling.get("parameter_space") or {}).items()}
        return cls(
            sampling=str(sampling.get("method")),
            seed=sampling.get("seed"),
            parameter_space=space,
            drawn_arguments=[word for name in space for word in argument_words(name, DRAWN)],
            primary_metric_name=str(recorded.get("primary_metric_name")),
            primary_metric_goal=str(recorded.get("primary_metric_goal")),
            policy=policy_text(recorded.get("policy") or {}),
            max_total_runs=int(recorded.get("max_total_runs") or 0),
            max_concurrent_runs=recorded.get("max_concurrent_runs"),
            max_duration_minutes=recorded.get("max_duration_minutes"),
            git=shared_git(git_states),
        )


def shared_git(states: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The git state each of a sweep's runs recorded of its code (``states``, a run's ``git`` each), when it is the
    same for all of them (commit, branch, repository, dirty and, if dirty, the stored diff, which is named by its
    content); None when they differ, the code was in no git checkout, or no run is recorded yet.

    The runs of one sweep snapshot the same folder one after another: code committed or edited while the sweep
    ran makes them differ, and each run's page then says what it ran.
    """
    first = states[0] if states else None
    if not first or not first.get("commit") or any(state != first for state in states[1:]):
        return None
    return dict(first)


def runs_to_read(sweep: RunRecord, runs: Sequence[RunRecord], command: str, verb: str) -> str:
    """Which of a sweep's runs to read for what it has none of itself (a log, a git state): the commands that give
    its best and first runs' (``amlrun runs logs <best>`` `verb` its best run's, ...), and how many it has.

    :param runs: the sweep's runs, oldest first.
    :param command: the command that gives a run's, its run id added (``amlrun runs logs``).
    :param verb: what the command does with it (``prints``).
    """
    if not runs:
        return "It recorded no runs." if sweep.status.is_terminal else "None of its runs is recorded yet."
    best, first = sweep.tags.get("best_run_id"), runs[0].id
    said = f"`{command} {first}` {verb} its first run's"
    if best == first:
        said += ", its best"
    elif best:
        said = f"`{command} {best}` {verb} its best run's, `{command} {first}` its first run's"
    return f"{said} ({len(runs)} {'run' if len(runs) == 1 else 'runs'} in all)."


def expression_text(recorded: Mapping[str, Any]) -> str:
    """A parameter's expression as Python writes it (``uniform(0.0, 1.0)``), from its recorded kind and args."""
    return f"{recorded.get('kind')}({', '.join(repr(a) for a in recorded.get('args') or [])})"


def policy_text(recorded: Mapping[str, Any]) -> str | None:
    """An early termination policy as Python writes it, the settings it was given by name; None for none."""
    fields = dict(recorded)
    name = str(fields.pop("policy", "NoTerminationPolicy"))
    if name == "NoTerminationPolicy":
        return None
    settings = ", ".join(f"{key}={value!r}" for key, value in fields.items() if value is not None)
    return f"{name}({settings})"
