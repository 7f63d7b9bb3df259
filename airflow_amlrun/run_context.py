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
import os
import shutil
import sys
import threading
import time
from typing import IO, Any

RUN_ID_ENV = "AMLRUN_RUN_ID"
EXPERIMENT_ENV = "AMLRUN_EXPERIMENT"
EVENTS_FILE_ENV = "AMLRUN_EVENTS_FILE"
OUTPUTS_DIR_ENV = "AMLRUN_OUTPUTS_DIR"


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
        """Record one value of a metric; the run keeps every value, and reports the last one per name."""
        self._record_metric(str(name), _jsonable(value), step)

    def log_list(self, name: str, values: list[Any], description: str = "") -> None:
        """Record a list of values of a metric, as successive steps."""
        for step, value in enumerate(values):
            self._record_metric(str(name), _jsonable(value), step)

    def tag(self, key: str, value: Any = "") -> None:
        """Set a tag on the run (a string key with a string value)."""
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

    def complete(self) -> None:
        """Kept for scripts written for Azure ML; the run completes when the script exits."""

    def _record_metric(self, name: str, value: Any, step: int | None) -> None:
        self.metrics.setdefault(name, []).append(value)
        event: dict[str, Any] = {"kind": "metric", "name": name, "value": value, "time": time.time()}
        if step is not None:
            event["step"] = int(step)
        self._emit(event)

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
    """A run outside any submission: keeps what is logged, prints it, and never raises."""

    @property
    def offline(self) -> bool:
        return True

    def log(self, name: str, value: Any, step: int | None = None, description: str = "") -> None:
        try:
            super().log(name, value, step, description)
        except Exception as err:  # an offline run must never break the script
            print(f"[offline run] could not log {name!r}: {err}", file=sys.stderr)

    def tag(self, key: str, value: Any = "") -> None:
        self.tags[str(key)] = str(value)
        print(f"[offline run] tag {key}={value}", file=sys.stderr)

    def upload_file(self, name: str, path_or_stream: str | os.PathLike[str] | IO[bytes]) -> str:
        print(f"[offline run] upload_file {name!r} skipped (not in a submitted run)", file=sys.stderr)
        return os.fspath(path_or_stream) if not hasattr(path_or_stream, "read") else name

    def _emit(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "metric":
            step = f" (step {event['step']})" if "step" in event else ""
            print(f"[offline run] {event['name']} = {event['value']}{step}", file=sys.stderr)
