"""Early termination policies: which live runs of a sweep to stop, from the primary metric they streamed.

A run's reports are the values of the primary metric it logged, in order. A policy looks at a run each time
it has a new report, from report ``delay_evaluation + 1`` on, every ``evaluation_interval`` reports, and
compares it with every run of the sweep (live or ended) that reached as many reports. It returns why the run
should stop, or None. Pure functions of the reports: no run is touched here.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from airflow_amlrun.errors import ConfigurationError, shown


class EarlyTerminationPolicy:
    """Stops no run; the base of the others."""

    def __init__(self, evaluation_interval: int = 1, delay_evaluation: int = 0) -> None:
        for what, value, least in (
            ("evaluation_interval", evaluation_interval, 1),
            ("delay_evaluation", delay_evaluation, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigurationError(
                    f"{type(self).__name__}: {what}={shown(value)} must be a whole number >= {least}."
                )
        self.evaluation_interval = evaluation_interval
        self.delay_evaluation = delay_evaluation

    def due(self, reports: int) -> bool:
        """Whether a run with this many reports is looked at now."""
        past = reports - self.delay_evaluation
        return past >= 1 and (past - 1) % self.evaluation_interval == 0

    def stop_reason(self, run_id: str, reports: Mapping[str, Sequence[float]], goal: str) -> str | None:
        """Why run_id should stop now, given every run's reports of the primary metric; None to go on."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": type(self).__name__,
            "evaluation_interval": self.evaluation_interval,
            "delay_evaluation": self.delay_evaluation,
        }


class NoTerminationPolicy(EarlyTerminationPolicy):
    """Every run goes on to its end."""


def _peers(reports: Mapping[str, Sequence[float]], n: int) -> dict[str, float]:
    """The n-th report of every run that has one."""
    return {run: values[n - 1] for run, values in reports.items() if len(values) >= n}


def _better(a: float, b: float, goal: str) -> bool:
    return a < b if goal == "minimize" else a > b


class BanditPolicy(EarlyTerminationPolicy):
    """Stops a run whose metric falls outside the slack of the best run's at the same report.

    :param slack_factor: allowed ratio: minimizing, stop above best * (1 + slack_factor); maximizing, below
        best / (1 + slack_factor).
    :param slack_amount: allowed difference instead: stop above best + slack_amount (below best - slack_amount).
    """

    def __init__(
        self,
        slack_factor: float | None = None,
        slack_amount: float | None = None,
        evaluation_interval: int = 1,
        delay_evaluation: int = 0,
    ) -> None:
        super().__init__(evaluation_interval, delay_evaluation)
        if (slack_factor is None) == (slack_amount is None):
            raise ConfigurationError("BanditPolicy needs exactly one of slack_factor or slack_amount.")
        for what, value in (("slack_factor", slack_factor), ("slack_amount", slack_amount)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
            ):
                raise ConfigurationError(f"BanditPolicy: {what}={shown(value)} must be a number >= 0.")
        self.slack_factor = slack_factor
        self.slack_amount = slack_amount

    def stop_reason(self, run_id: str, reports: Mapping[str, Sequence[float]], goal: str) -> str | None:
        n = len(reports[run_id])
        if not self.due(n):
            return None
        peers = _peers(reports, n)
        best = min(peers.values()) if goal == "minimize" else max(peers.values())
        value = peers[run_id]
        if self.slack_factor is not None:
            # Relative to the best value's size, so that a metric at or below zero keeps its best run: for a
            # positive best this is best * (1 + s) minimizing and best / (1 + s) maximizing.
            room = abs(best) * self.slack_factor
            limit = best + room if goal == "minimize" else best - room / (1 + self.slack_factor)
            slack = f"slack_factor {self.slack_factor:g}"
        else:
            assert self.slack_amount is not None
            limit = best + self.slack_amount if goal == "minimize" else best - self.slack_amount
            slack = f"slack_amount {self.slack_amount:g}"
        if _better(limit, value, goal):
            return (
                f"Canceled by BanditPolicy at report {n}: {value:g} is outside {slack} of the best run's "
                f"{best:g} (limit {limit:g}, goal {goal})."
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "slack_factor": self.slack_factor, "slack_amount": self.slack_amount}


class MedianStoppingPolicy(EarlyTerminationPolicy):
    """Stops a run whose best value so far is worse than the median of all runs' running averages."""

    def stop_reason(self, run_id: str, reports: Mapping[str, Sequence[float]], goal: str) -> str | None:
        n = len(reports[run_id])
        if not self.due(n):
            return None
        averages = [statistics.fmean(values[:n]) for values in reports.values() if len(values) >= n]
        if len(averages) < 2:
            return None
        median = statistics.median(averages)
        mine = reports[run_id][:n]
        best = min(mine) if goal == "minimize" else max(mine)
        if _better(median, best, goal):
            return (
                f"Canceled by MedianStoppingPolicy at report {n}: its best {best:g} is worse than the median "
                f"{median:g} of the runs' running averages (goal {goal})."
            )
        return None


class TruncationSelectionPolicy(EarlyTerminationPolicy):
    """Stops a run in the worst ``truncation_percentage`` percent of the runs at the same report."""

    def __init__(
        self, truncation_percentage: int, evaluation_interval: int = 1, delay_evaluation: int = 0
    ) -> None:
        super().__init__(evaluation_interval, delay_evaluation)
        if (
            isinstance(truncation_percentage, bool)
            or not isinstance(truncation_percentage, int)
            or not (1 <= truncation_percentage <= 99)
        ):
            raise ConfigurationError(
                f"TruncationSelectionPolicy: truncation_percentage={shown(truncation_percentage)} must be a whole "
                "number from 1 to 99."
            )
        self.truncation_percentage = truncation_percentage

    def stop_reason(self, run_id: str, reports: Mapping[str, Sequence[float]], goal: str) -> str | None:
        n = len(reports[run_id])
        if not self.due(n):
            return None
        peers = _peers(reports, n)
        cut = len(peers) * self.truncation_percentage // 100
        if cut == 0:
            return None
        # Worst first; ties keep the run (it is not strictly among the worst).
        ranked = sorted(peers.values(), reverse=goal == "minimize")
        threshold = ranked[cut - 1]
        value = peers[run_id]
        # A value tied across the cut is kept: the runs with it are not all among the worst.
        if value == threshold and cut < len(ranked) and ranked[cut] == threshold:
            return None
        if not _better(value, threshold, goal):
            return (
                f"Canceled by TruncationSelectionPolicy at report {n}: {value:g} is among the worst "
                f"{self.truncation_percentage}% of the {len(peers)} runs there (goal {goal})."
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "truncation_percentage": self.truncation_percentage}


_POLICIES: dict[str, type[EarlyTerminationPolicy]] = {
    cls.__name__: cls
    for cls in (NoTerminationPolicy, BanditPolicy, MedianStoppingPolicy, TruncationSelectionPolicy)
}


def policy_from_dict(data: Mapping[str, Any]) -> EarlyTerminationPolicy:
    """The policy ``to_dict`` described (what a sweep's trigger is given, and its parent run records)."""
    fields = dict(data)
    name = str(fields.pop("policy", ""))
    if name not in _POLICIES:
        raise ConfigurationError(
            f"Unknown early termination policy {name!r}: one of {', '.join(sorted(_POLICIES))}."
        )
    return _POLICIES[name](**fields)
