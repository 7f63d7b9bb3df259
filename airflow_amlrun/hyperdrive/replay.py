"""The sampler of a sweep as an earlier process left it, rebuilt from the runs it recorded.

A sweep taken over by another process (a retry of its task after the worker died, or a deferred task coming
back from the triggerer) goes on with the draws the earlier process would have made. Optuna's samplers are
seeded and deterministic in what they are told, so the recorded runs are replayed in the order they happened:
an ask at each run's creation (the draw it recorded is checked against the replayed one), a tell at each
ended run's end with its outcome. The next ask then gives the draw that comes next in the seeded sequence.
Should a replayed draw differ (another Optuna version), the recorded parameters are fed to the sampler
instead, so that it still learns from every run, and the draws go on from there (warned of).

A grid goes on with its points that no recorded run has taken.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_amlrun.history import RunStatus
from airflow_amlrun.hyperdrive.parameters import GridParameterSampling

if TYPE_CHECKING:
    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.hyperdrive.config import HyperDriveConfig

log = logging.getLogger(__name__)

HYPERPARAMETERS_TAG = "hyperparameters"


def parameters_tag(params: dict[str, Any]) -> str:
    """How a run records its parameters (the tag ``hyperparameters``)."""
    return json.dumps(params, sort_keys=True)


@dataclass
class Sampler:
    """What draws a sweep's next parameters: an Optuna study, or the grid's points left."""

    study: Any
    grid: Iterator[dict[str, Any]] | None
    # The asked trial of each run still going on, to tell its outcome once it ends.
    trials: dict[str, Any] = field(default_factory=dict)
    replayed: bool = True

    def next_parameters(self, config: HyperDriveConfig) -> tuple[dict[str, Any], Any] | None:
        """The next run's parameters and its trial (None for a grid), or None when a grid is walked."""
        if self.grid is not None:
            params = next(self.grid, None)
            return None if params is None else (params, None)
        space = config.hyperparameter_sampling.parameter_space
        trial = self.study.ask({name: e.distribution() for name, e in space.items()})
        return {name: space[name].value(trial.params[name]) for name in space}, trial

    def discard(self, trial: Any) -> None:
        """A drawn trial whose run never started."""
        if trial is not None:
            self.study.tell(trial, state=_trial_state("FAIL"))

    def tell(self, run_id: str, state: str, value: float | None = None) -> None:
        """Tell the sampler how a run ended: ``COMPLETE`` with its value, ``PRUNED`` or ``FAIL``."""
        trial = self.trials.pop(run_id, None)
        if trial is None:
            return
        if state == "COMPLETE":
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=_trial_state(state))


def new_sampler(config: HyperDriveConfig) -> Sampler:
    """The sampler of a sweep that has no runs yet."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampling = config.hyperparameter_sampling
    study = optuna.create_study(
        direction="minimize" if config.goal == "minimize" else "maximize",
        sampler=sampling.sampler() or optuna.samplers.RandomSampler(),
    )
    grid = iter(sampling.grid()) if isinstance(sampling, GridParameterSampling) else None
    return Sampler(study, grid)


def outcome(record: RunRecord, metric: str) -> tuple[str, float | None]:
    """What the sampler is told of an ended run: COMPLETE with its final metric, PRUNED (stopped), or FAIL."""
    value = record.metrics.get(metric)
    if (
        record.status is RunStatus.COMPLETED
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ):
        return "COMPLETE", float(value)
    if record.status is RunStatus.CANCELED:
        return "PRUNED", None
    return "FAIL", None


def restored_sampler(config: HyperDriveConfig, children: list[RunRecord]) -> Sampler:
    """The sampler as it stood after the recorded runs (oldest first): the runs still going on have a trial
    waiting for their outcome."""
    sampler = new_sampler(config)
    if sampler.grid is not None:
        taken = Counter(c.tags.get(HYPERPARAMETERS_TAG) for c in children)
        points = []
        for params in sampler.grid:
            key = parameters_tag(params)
            if taken[key] > 0:
                taken[key] -= 1
            else:
                points.append(params)
        sampler.grid = iter(points)
        return sampler
    replayed = _replay(config, children, exact=True)
    if replayed is not None:
        return replayed
    log.warning(
        "The sweep's sampler did not draw again what its runs recorded (was Optuna upgraded?): it is told "
        "their recorded parameters and outcomes instead, and its later draws are not the seeded sequence's."
    )
    fed = _replay(config, children, exact=False)
    assert fed is not None
    return fed


def _replay(config: HyperDriveConfig, children: list[RunRecord], *, exact: bool) -> Sampler | None:
    sampler = new_sampler(config)
    space = config.hyperparameter_sampling.parameter_space
    # Asks at creation, tells at the end; at one instant, the end first (a slot was freed, then filled).
    events: list[tuple[datetime, int, int, RunRecord]] = []
    for n, child in enumerate(children):
        events.append((_aware(child.created_at), 1, n, child))
        if child.status.is_terminal:
            events.append((_aware(child.end or datetime.max.replace(tzinfo=UTC)), 0, n, child))
    for _, kind, _, child in sorted(events, key=lambda e: e[:3]):
        if kind == 0:
            sampler.tell(child.id, *outcome(child, config.primary_metric_name))
            continue
        recorded = child.tags.get(HYPERPARAMETERS_TAG)
        if not exact:
            drawn = _recorded_draw(config, recorded)
            if drawn is not None:
                sampler.study.enqueue_trial(drawn, skip_if_exists=False)
        with warnings.catch_warnings():
            # A recorded value a quantized expression rounded past its bounds: fed as it is, on purpose.
            warnings.simplefilter("ignore")
            trial = sampler.study.ask({name: e.distribution() for name, e in space.items()})
        params = {name: space[name].value(trial.params[name]) for name in space}
        if exact and parameters_tag(params) != recorded:
            return None
        sampler.trials[child.id] = trial
    sampler.replayed = exact
    return sampler


def _recorded_draw(config: HyperDriveConfig, recorded: str | None) -> dict[str, Any] | None:
    """What the sampler drew for the recorded parameters of a run (None if they cannot be read)."""
    try:
        params = json.loads(recorded or "")
    except ValueError:
        return None
    space = config.hyperparameter_sampling.parameter_space
    if not isinstance(params, dict) or set(params) != set(space):
        return None
    return {name: space[name].drawn(value) for name, value in params.items()}


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _trial_state(name: str) -> Any:
    from optuna.trial import TrialState

    return getattr(TrialState, name)
