"""Progress of the long steps of a submission (a snapshot's upload, an environment's build, a download), for
whoever shows it: the `amlrun` command line draws bars of it; everywhere else nothing is reported.

The steps report to the reporter of the current context, so that no signature between the command line and
the step has to carry it. Without one, a step costs a context-variable lookup and changes nothing.

    with reporting(my_reporter):
        experiment.submit(config)   # the snapshot's files and the environment's build are reported
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Protocol


class Reporter(Protocol):
    """What shows progress: a step starts, advances by some of its total, and ends."""

    def start(self, description: str, total: float | None, unit: str) -> object:
        """A new step; the returned token names it in ``advance`` and ``finish``.

        :param total: how much the step has to do, or None when that is not known.
        :param unit: what it counts: "files", "bytes", or "" (steps of its own).
        """

    def advance(self, token: object, amount: float) -> None: ...

    def finish(self, token: object) -> None: ...


_current: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("amlrun_progress", default=None)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Report the steps run inside the block to ``reporter``."""
    token = _current.set(reporter)
    try:
        yield
    finally:
        _current.reset(token)


def _nothing(amount: float = 1) -> None:
    return None


@contextlib.contextmanager
def step(description: str, total: float | None = None, unit: str = "") -> Iterator[Callable[[float], None]]:
    """A step of work, reported if anything reports; yields the function that advances it.

    The function is meant to be called from the thread that entered the step (threads of a pool have
    contexts of their own).

    :param description: what the step does, e.g. "Uploading snapshot of train/".
    :param total: its size in the units it advances by, or None.
    :param unit: what it counts: "files", "bytes", or "" (steps of its own).
    """
    reporter = _current.get()
    if reporter is None:
        yield _nothing
        return
    token = reporter.start(description, total, unit)

    def advance(amount: float = 1) -> None:
        reporter.advance(token, amount)

    try:
        yield advance
    finally:
        reporter.finish(token)
