"""What a training script imports to log metrics, tags and files: `Run.get_context()`.

This module imports only the standard library: a container or remote host that runs the script needs
nothing else installed, only this one file on its path.

Inside a submitted run, the target sets AMLRUN_RUN_ID and AMLRUN_EVENTS_FILE; every logged value is
appended to that file as one JSON line, which the submitting side reads while the run goes on. Outside a
submitted run, `Run.get_context()` returns an offline run that keeps and prints what is logged.
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
import sys
import threading
import time
from typing import IO, Any

# What the run history keeps of a metric; the submitting side checks every event against the same rules.
MAX_METRIC_NAME_LENGTH = 255
MIN_STEP, MAX_STEP = -(2**63), 2**63 - 1

# What the worker passes to a run and how (the variables below, the events file's lines and the files the MLflow
# capture, mlflow_capture/, writes for the worker to read): change the number whenever that changes. A run's stand-in package hands over to an airflow-amlrun installed on the run's
# interpreter only when that one's run_context declares the same number (targets/standin_package.py reads this
# line from the file's text: keep it one plain integer).
RUN_PROTOCOL = 1

# Tag names the provider keeps for what it records of a run (why a stop was asked, who settled it): a script or a
# user setting one would make the run's record say something untrue. The worker drops such tags from the events.
RESERVED_TAG_PREFIX = "amlrun."

RUN_ID_ENV = "AMLRUN_RUN_ID"
EXPERIMENT_ENV = "AMLRUN_EXPERIMENT"
EVENTS_FILE_ENV = "AMLRUN_EVENTS_FILE"
OUTPUTS_DIR_ENV = "AMLRUN_OUTPUTS_DIR"


class MetricError(ValueError):
    """A metric the run history cannot keep: an empty or too long name, or a step that is not a 64-bit integer.

    Raised by an offline run only: in a submitted run such a point is dropped with a warning, and the run goes on.
    """


def metric_problem(name: object, value: object, step: object) -> str | None:
    """What makes a metric unfit for the run history, or None if it is fine.

    :param name: the metric's name: a string of 1 to 255 characters.
    :param value: its value, which must be JSON-serialisable.
    :param step: None, or an integer in the signed 64-bit range.
    """
    if not isinstance(name, str) or not name.strip():
        return f"metric name {name!r} must be a non-empty string"
    if len(name) > MAX_METRIC_NAME_LENGTH:
        return (
            f"metric name {name[:40]!r}... is {len(name)} characters long; the run history keeps names of at "
            f"most {MAX_METRIC_NAME_LENGTH}"
        )
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int) or not MIN_STEP <= step <= MAX_STEP
    ):
        return f"step {step!r} of metric {name!r} must be an integer from -2**63 to 2**63-1"
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return f"the value of metric {name!r} ({type(value).__name__}) cannot be written as JSON"
    return None


def _step(step: Any) -> Any:
    # Integral values of any integer type (numpy, torch) or an integral float are steps; anything else is
    # left for metric_problem to name.
    if step is None or isinstance(step, bool):
        return step
    if isinstance(step, float) and step.is_integer():
        return int(step)
    try:
        return operator.index(step)
    except TypeError:
        return step


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class Run:
    """The run a script executes in; get it with `Run.get_context()`."""

    def __init__(
        self, run_id: str, experiment: str | None, events_file: str | None, outputs_dir: str
    ) -> None:
        self.id = run_id
        self.experiment_name = experiment
        self.outputs_dir = outputs_dir
        self._events_file = events_file
        self._lock = threading.Lock()
        self._stream: IO[str] | None = None
        self.metrics: dict[str, list[Any]] = {}
        self.tags: dict[str, str] = {}
        # Metrics already warned about: a training loop logging a bad point every step warns once.
        self._refused: set[str] = set()

    @classmethod
    def get_context(cls) -> Run:
        """The current submitted run, or an offline run when the script was started by hand."""
        run_id = os.environ.get(RUN_ID_ENV)
        events = os.environ.get(EVENTS_FILE_ENV)
        outputs = os.environ.get(OUTPUTS_DIR_ENV) or "outputs"
        if run_id and events:
            return cls(run_id, os.environ.get(EXPERIMENT_ENV), events, outputs)
        return OfflineRun(f"OfflineRun_{int(time.time())}", None, None, outputs)

    @property
    def offline(self) -> bool:
        return False

    def log(self, name: str, value: Any, step: int | None = None, description: str = "") -> None:
        """Record one value of a metric; the run keeps every value, and reports the last one per name.

        A point the run history cannot keep (an empty name or one longer than 255 characters, a step that is
        not an integer in the signed 64-bit range) is not recorded: a submitted run says so on stderr, which
        reaches the run's log and the task log, once per metric, and goes on; an offline run raises
        `MetricError`.
        """
        self._record_metric(str(name), _jsonable(value), _step(step))

    def log_list(self, name: str, values: list[Any], description: str = "") -> None:
        """Record a list of values of a metric, as successive steps."""
        for step, value in enumerate(values):
            self._record_metric(str(name), _jsonable(value), step)

    def tag(self, key: str, value: Any = "") -> None:
        """Set a tag on the run (a string key with a string value)."""
        _check_tag_name(key)
        self.tags[str(key)] = str(value)
        self._emit({"kind": "tag", "key": str(key), "value": str(value)})

    def upload_file(self, name: str, path_or_stream: str | os.PathLike[str] | IO[bytes]) -> str:
        """Place a file among the run's outputs under `name`; returns the path it was written to."""
        dest = os.path.join(self.outputs_dir, name)
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise ValueError(f"upload_file name {name!r} must be a relative path inside the outputs")
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        if isinstance(path_or_stream, str | os.PathLike):
            if os.path.abspath(os.fspath(path_or_stream)) != os.path.abspath(dest):
                shutil.copyfile(os.fspath(path_or_stream), dest)
        else:
            with open(dest, "wb") as out:
                shutil.copyfileobj(path_or_stream, out)
        return dest

    def register_model(
        self,
        model_name: str,
        model_path: str,
        tags: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        """Register a file or folder of this run's outputs (``outputs/model.pkl``) as the next version of a
        model, once the run has Completed and its outputs are collected; a run that fails registers nothing.
        """
        if not isinstance(model_name, str) or not isinstance(model_path, str):
            raise TypeError("register_model takes a model name and a path in the outputs, both strings")
        self._emit(
            {
                "kind": "register_model",
                "name": model_name,
                "path": model_path,
                "tags": {str(k): str(v) for k, v in (tags or {}).items()},
                "properties": {str(k): _jsonable(v) for k, v in (properties or {}).items()},
            }
        )

    def complete(self) -> None:
        """Kept for scripts written for Azure ML; the run completes when the script exits."""

    def _record_metric(self, name: str, value: Any, step: Any) -> None:
        problem = metric_problem(name, value, step)
        if problem is not None:
            self._refuse(name, problem)
            return
        self.metrics.setdefault(name, []).append(value)
        event: dict[str, Any] = {"kind": "metric", "name": name, "value": value, "time": time.time()}
        if step is not None:
            event["step"] = step
        self._emit(event)

    def _refuse(self, name: str, problem: str) -> None:
        """A point the history cannot keep: dropped, with a warning; the training goes on."""
        if name in self._refused:
            return
        self._refused.add(name)
        shown = name if len(name) <= 60 else f"{name[:40]}..."
        print(
            f"amlrun: WARNING: Run.log: a point of metric {shown!r} was not recorded: {problem}. The run goes "
            "on; further points of this metric the run history cannot keep are dropped without another warning.",
            file=sys.stderr,
            flush=True,
        )

    def _emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with self._lock:
            if self._stream is None:
                # Line-buffered append: each event reaches the file whole, as soon as it is logged.
                self._stream = open(self._events_file or os.devnull, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._stream.write(line)
            self._stream.flush()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, experiment={self.experiment_name!r})"


class OfflineRun(Run):
    """A run outside any submission: keeps what is logged and prints it.

    It does without everything a submission provides (an events file, an outputs folder), but raises
    `MetricError` for a metric the run history would refuse, so a script tried by hand shows the
    mistake at once, where a submitted run would only warn and drop the point.
    """

    @property
    def offline(self) -> bool:
        return True

    def tag(self, key: str, value: Any = "") -> None:
        _check_tag_name(key)
        self.tags[str(key)] = str(value)
        print(f"[offline run] tag {key}={value}", file=sys.stderr)

    def _refuse(self, name: str, problem: str) -> None:
        raise MetricError(f"Run.log: {problem}; nothing was recorded.")

    def upload_file(self, name: str, path_or_stream: str | os.PathLike[str] | IO[bytes]) -> str:
        print(f"[offline run] upload_file {name!r} skipped (not in a submitted run)", file=sys.stderr)
        return os.fspath(path_or_stream) if not hasattr(path_or_stream, "read") else name

    def _emit(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "register_model":
            print(
                f"[offline run] register_model {event['name']!r} skipped (not in a submitted run)",
                file=sys.stderr,
            )
        if event.get("kind") == "metric":
            step = f" (step {event['step']})" if "step" in event else ""
            print(f"[offline run] {event['name']} = {event['value']}{step}", file=sys.stderr)


def _check_tag_name(key: object) -> None:
    if str(key).startswith(RESERVED_TAG_PREFIX):
        raise ValueError(
            f"Run.tag: the name {str(key)!r} starts with {RESERVED_TAG_PREFIX!r}, which the provider keeps for its "
            "own tags; choose another name (for instance without that prefix). Nothing was recorded."
        )
