"""What a sweep's early-termination policy has seen: every run's reports of the primary metric, read from the
run history, and how many of each live run's reports it judged.

The sweep's own loop and the trigger of a deferred sweep both judge through it, and hand ``looked_at`` to each
other: a report is judged once, when it is first seen, against every run that reached as many reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from airflow_amlrun.hyperdrive.policies import EarlyTerminationPolicy, NoTerminationPolicy

if TYPE_CHECKING:
    from airflow_amlrun.history import RunHistory


class PolicyWatch:
    """Reports of the primary metric by run, and the policy's verdict on the live runs' new ones.

    :param looked_at: reports of each run judged already (by another process that watched the sweep).
    """

    def __init__(
        self,
        history: RunHistory,
        policy: EarlyTerminationPolicy,
        metric: str,
        goal: str,
        looked_at: Mapping[str, int] | None = None,
    ) -> None:
        self.history = history
        self.policy = policy
        self.metric = metric
        self.goal = goal
        self.reports: dict[str, list[float]] = {}
        self.looked_at: dict[str, int] = {str(k): int(v) for k, v in (looked_at or {}).items()}
        # Points read of each run's metric, numbers or not (a report is a number; a point may not be).
        self._read: dict[str, int] = {}

    @property
    def judges(self) -> bool:
        return not isinstance(self.policy, NoTerminationPolicy)

    def refresh(self, run_id: str) -> None:
        """Read the run's points of the primary metric logged after the last one read."""
        points = self.history.get_metrics(run_id, name=self.metric)
        read = self._read.get(run_id, 0)
        self._read[run_id] = len(points)
        self.reports.setdefault(run_id, []).extend(
            float(p.value)
            for p in points[read:]
            if isinstance(p.value, int | float) and not isinstance(p.value, bool)
        )

    def judge(self, live: Iterable[str]) -> dict[str, str]:
        """Why each of the live runs should stop, for those the policy stops: every report that fell due since
        the last look is judged as if the run had just logged it. The runs not named go on."""
        live = list(live)
        if not self.judges:
            return {}
        for run_id in live:
            self.refresh(run_id)
        stops: dict[str, str] = {}
        for run_id in live:
            reports = self.reports[run_id]
            seen = self.looked_at.get(run_id, 0)
            self.looked_at[run_id] = len(reports)
            for n in range(seen + 1, len(reports) + 1):
                reason = self.policy.stop_reason(run_id, {**self.reports, run_id: reports[:n]}, self.goal)
                if reason is not None:
                    stops[run_id] = reason
                    break
        return stops

    def ended(self, run_id: str) -> None:
        """A run ended: its whole series is read, for the runs compared with it later."""
        if self.judges:
            self.refresh(run_id)
        self.looked_at.pop(run_id, None)
