"""The run history as JSON: experiments, the run list, one run (its metrics, log, code and outputs), a
comparison of runs and the diff of two runs' code.

Every route shows only runs the signed-in user may see (`access`): a list leaves the others out, a route about
one run answers 403 for them, a comparison or a diff answers 403 if any of its runs is not the user's to see.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from airflow_amlrun.history import RunHistory, RunNotFoundError, RunRecord
from airflow_amlrun.history.listing import RunFilter, RunListItem
from airflow_amlrun.history.metricstore import MetricSummary, Series
from airflow_amlrun.history.paging import BadListRequestError, RunSort, parameters
from airflow_amlrun.plugin import params, schemas
from airflow_amlrun.plugin.access import Reader, ReaderDep, VisibleRunsDep

if TYPE_CHECKING:
    from airflow_amlrun.snapshot import SnapshotEntry
    from airflow_amlrun.workspace import Workspace

router = APIRouter(prefix="/api")

# Most runs one comparison takes.
COMPARE_LIMIT = 100


# How long the workspace found for the pages is used before its connection is looked up again.
WORKSPACE_TTL_SECONDS = 30.0
_workspace: tuple[float, Workspace] | None = None


def workspace() -> Workspace:
    """The workspace the plugin shows (``[amlrun] workspace_conn_id``), looked up again every 30 s.

    Looking up the connection costs a request a millisecond or more (a query of Airflow's database);
    a changed connection is seen within WORKSPACE_TTL_SECONDS.
    """
    global _workspace
    from airflow_amlrun.workspace import Workspace

    now = time.monotonic()
    if _workspace is None or now - _workspace[0] > WORKSPACE_TTL_SECONDS:
        _workspace = (now, Workspace.get())
    return _workspace[1]


def history() -> RunHistory:
    """The run history of the workspace the plugin shows."""
    return workspace().history


def visible_run(run_id: str, reader: Reader) -> RunRecord:
    """The run, if it exists (else 404) and the reader may see it (else 403)."""
    return _visible_detail(run_id, reader)[0]


def _visible_detail(run_id: str, reader: Reader) -> tuple[RunRecord, list[MetricSummary]]:
    try:
        record, summaries = history().run_detail(run_id)
    except RunNotFoundError:
        # The history's own message names the database; a reader of the pages need not learn where it is.
        raise HTTPException(status_code=404, detail=f"No run {run_id!r}.") from None
    reader.check(record)
    return record, summaries


@router.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request) -> dict[str, Any]:
    """The API's OpenAPI schema, for signed-in users only (FastAPI's own route would serve it to anyone)."""
    schema: dict[str, Any] = request.app.openapi()
    return schema


@router.get("/experiments", response_model=list[schemas.ExperimentOut])
def list_experiments(visible: VisibleRunsDep) -> list[dict[str, Any]]:
    """Experiments with runs the caller may see, by name: how many, and when the newest was created."""
    experiments = history().list_experiments(**visible.history_filter())
    return [
        {"name": e.name, "runs": e.run_count, "created_at": e.created_at, "last_run_at": e.last_run_at}
        for e in experiments
    ]


@router.get("/runs", response_model=schemas.RunPageOut)
def list_runs(
    visible: VisibleRunsDep,
    experiment: str | None = None,
    status: Annotated[
        list[str] | None, Query(description="Any of these statuses (repeat the parameter).")
    ] = None,
    target: str | None = None,
    dag_id: str | None = None,
    tag: Annotated[
        list[str] | None, Query(description="KEY=VALUE: runs carrying this tag (repeatable).")
    ] = None,
    metric: Annotated[
        list[str] | None, Query(description="NAME:LOW:HIGH: runs whose latest NAME is in range (repeatable).")
    ] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    sort: Annotated[
        str, Query(description="A column or metrics.NAME, '-' first for descending.")
    ] = "-created_at",
    cursor: Annotated[str | None, Query(description="The next_cursor of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Runs the caller may see, filtered, sorted and paged by cursor."""
    try:
        where = RunFilter(
            experiment=experiment,
            statuses=tuple(params.statuses(status or [])),
            target=target,
            dag_id=dag_id,
            tags=tuple(params.tag(t, history().engine.dialect.name) for t in tag or []),
            metrics=tuple(params.metric_range(m) for m in metric or []),
            created_after=created_after,
            created_before=created_before,
            **visible.history_filter(),
        )
        page = history().page_runs(where, RunSort.parse(sort), limit=limit, cursor=cursor)
    except BadListRequestError as err:
        raise HTTPException(status_code=400, detail=str(err)) from None
    return _json({"runs": [_listed(r) for r in page.runs], "next_cursor": page.next_cursor})


@router.get("/task-runs", response_model=list[schemas.RunOut])
def task_runs(
    visible: VisibleRunsDep,
    dag_id: str,
    run_id: Annotated[str, Query(description="The DAG run's id.")],
    task_id: str,
    map_index: Annotated[
        int | None, Query(description="The mapped task's index; -1 or none if unmapped.")
    ] = None,
) -> Response:
    """The runs one task instance submitted, newest first (one per try that got as far)."""
    if not visible.sees(dag_id):
        # The same answer for a DAG the caller may not read as for a task that submitted nothing: no runs.
        return _json([])
    records = history().list_runs(
        dag_id=dag_id,
        airflow_run_id=run_id,
        task_id=task_id,
        map_index=map_index if map_index is not None and map_index >= 0 else None,
        limit=100,
    )
    return _json([_listed(r) for r in records])


@router.get("/runs/{run_id}/children", response_model=list[schemas.RunOut])
def child_runs(run_id: str, reader: ReaderDep, visible: VisibleRunsDep) -> Response:
    """The runs of a sweep (the runs whose parent this run is), oldest first."""
    visible_run(run_id, reader)
    return _json([_listed(r) for r in history().child_runs(run_id) if visible.sees(r.dag_id)])


@router.get("/runs/{run_id}", response_model=schemas.RunDetailOut)
def get_run(run_id: str, reader: ReaderDep) -> Response:
    """One run: its config, environment, git state, snapshot, outcome and each metric in brief; for a sweep, how
    it searched."""
    from airflow_amlrun.hyperdrive.recorded import RecordedSweep
    from airflow_amlrun.runconfig import SWEEP_TARGET

    record, summaries = _visible_detail(run_id, reader)
    states = history().child_git_states(record.id) if record.target == SWEEP_TARGET else []
    # Its runs are its task's, of the DAG the reader was just allowed. One of another DAG (none is written so) is
    # not the reader's to learn of: then nothing is said to be shared.
    shared = [git for dag_id, git in states] if all(dag_id == record.dag_id for dag_id, _ in states) else []
    sweep = RecordedSweep.of(record, shared)
    return _json(
        {
            **_listed(record),
            "script": record.script,
            "command": record.command,
            "arguments": record.arguments,
            "environment": record.environment,
            "snapshot_id": record.snapshot_id,
            "git": record.git,
            "error": record.error,
            "heartbeat_at": record.heartbeat_at,
            "max_run_duration_seconds": record.max_run_duration_seconds,
            "parent_run_id": record.parent_run_id,
            "rerun_of": record.rerun_of,
            "has_log": record.logs_uri is not None,
            "has_outputs": record.outputs_uri is not None,
            "metric_summaries": [vars(s) for s in summaries],
            "sweep": vars(sweep) if sweep is not None else None,
        }
    )


@router.get("/runs/{run_id}/metrics", response_model=list[schemas.SeriesOut])
def run_metrics(
    run_id: str,
    reader: ReaderDep,
    name: Annotated[list[str] | None, Query(description="The metrics (repeatable); all if none.")] = None,
    points: Annotated[int, Query(ge=2, le=20000, description="Most points per series.")] = 2000,
) -> Response:
    """A run's metrics as charts: at most `points` points each, every slice's minimum and maximum kept."""
    visible_run(run_id, reader)
    return _json([_series(s) for s in history().metric_series(run_id, name, points=points)])


@router.get("/compare", response_model=schemas.CompareOut)
def compare_runs(
    visible: VisibleRunsDep,
    run_id: Annotated[
        list[str], Query(description=f"The runs (2 to {COMPARE_LIMIT}; repeat the parameter).")
    ],
    name: Annotated[
        list[str] | None, Query(description="The metrics to chart (repeatable); all if none.")
    ] = None,
    points: Annotated[int, Query(ge=2, le=5000, description="Most points per run and metric.")] = 500,
) -> Response:
    """Runs side by side: their parameters and final metrics, what differs, and their metrics' series."""
    wanted = list(dict.fromkeys(run_id))
    if not 1 <= len(wanted) <= COMPARE_LIMIT:
        raise HTTPException(
            400, f"Compare 1 to {COMPARE_LIMIT} runs, not {len(wanted)}: pass run_id once per run."
        )
    runs, series = history().compare(wanted, name, points=points)
    shown = {r.id: r for r in runs}
    for one in wanted:
        run = shown.get(one)
        if run is None:
            raise HTTPException(404, f"No run {one!r}.")
        if not visible.sees(run.dag_id):
            # As a route about that one run answers: the run exists, and nothing more of it is said.
            raise HTTPException(
                403, f"Run {one!r} is not one you may see: compare runs of DAGs you may read."
            )
    params = {r.id: parameters(r.arguments) for r in runs}
    return _json(
        {
            "runs": [
                {
                    "run_id": r.id,
                    "experiment": r.experiment,
                    "status": str(r.status),
                    "parameters": params[r.id],
                    "metrics": r.metrics,
                }
                for r in runs
            ],
            "differing_parameters": _differing([params[r.id] for r in runs]),
            "differing_metrics": _differing([r.metrics for r in runs]),
            "series": [
                {"run_id": one, "series": [_series(s) for s in series.get(one, [])]} for one in wanted
            ],
        }
    )


@router.get("/runs/{run_id}/log", response_model=schemas.LogOut)
def run_log(
    run_id: str,
    reader: ReaderDep,
    target_offset: Annotated[int, Query(ge=0)] = 0,
    store_offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """The lines of a run's log from a position: on its target while it runs, from the store once it ended.

    Start at 0 and 0, then pass back the offsets each answer gives, until `ended`.
    """
    from airflow_amlrun.run_log import LogPosition, LogUnavailableError, RunLog

    visible_run(run_id, reader)
    log = RunLog(workspace(), run_id)
    try:
        read = log.read(LogPosition(target_offset, store_offset))
    except LogUnavailableError as err:
        raise HTTPException(404, log.shown(str(err))) from None
    return {
        "lines": [log.shown(line) for line in read.lines],
        "target_offset": read.position.on_target,
        "store_offset": read.position.in_store,
        "ended": read.ended,
        "status": str(read.record.status),
    }


@router.get("/runs/{run_id}/environment/lock", response_class=Response)
def environment_lock(run_id: str, reader: ReaderDep) -> Response:
    """The lock of the environment the run used (the exact packages), as text."""
    record = visible_run(run_id, reader)
    digest = (record.environment or {}).get("lock_digest")
    if not isinstance(digest, str):
        raise HTTPException(404, f"Run {run_id} recorded no environment lock (a user-managed environment?).")
    return Response(workspace().store.get_bytes(digest), media_type="text/plain; charset=utf-8")


@router.get("/runs/{run_id}/snapshot", response_model=schemas.SnapshotOut)
def run_snapshot(run_id: str, reader: ReaderDep) -> dict[str, Any]:
    """The files of the code the run ran: path, size, content hash (or link target)."""
    snapshot = _snapshot(visible_run(run_id, reader))
    return {
        "snapshot_id": snapshot.id,
        "files": [
            {"path": e.path, "size": e.size, "digest": e.digest, "link": e.link} for e in snapshot.entries
        ],
    }


@router.get("/runs/{run_id}/snapshot/file", response_model=schemas.FileTextOut)
def snapshot_file(run_id: str, reader: ReaderDep, path: str) -> dict[str, Any]:
    """One file of the run's code, as text (null when it is binary or over 1 MiB)."""
    entry = _entry(_snapshot(visible_run(run_id, reader)), path)
    if entry is None:
        raise HTTPException(404, f"Run {run_id}'s code has no file {path!r}.")
    return {"path": path, "size": entry.size, "text": _text(entry)}


@router.get("/diff", response_model=schemas.SnapshotDiffOut)
def diff_runs(reader: ReaderDep, run_a: str, run_b: str, path: str | None = None) -> dict[str, Any]:
    """How run_b's code differs from run_a's: files added, removed, changed; with `path`, that file's diff."""
    from airflow_amlrun.snapshot.diff import compare, unified

    a, b = _snapshot(visible_run(run_a, reader)), _snapshot(visible_run(run_b, reader))
    found = compare(a, b)
    diff = None
    if path is not None:
        old, new = _entry(a, path), _entry(b, path)
        if old is None and new is None:
            raise HTTPException(404, f"Neither run's code has a file {path!r}.")
        old_text, new_text = (_text(e) if e is not None else None for e in (old, new))
        binary = (old is not None and old_text is None) or (new is not None and new_text is None)
        diff = None if binary else unified(path, old_text, new_text)
    return {"run_a": run_a, "run_b": run_b, **vars(found), "path": path, "diff": diff}


@router.get("/runs/{run_id}/outputs", response_model=list[schemas.OutputOut])
def run_outputs(run_id: str, reader: ReaderDep) -> list[dict[str, Any]]:
    """The files the run left in its outputs/ folder."""
    return [{"path": p} for p in _outputs(visible_run(run_id, reader))]


@router.get("/runs/{run_id}/outputs/{path:path}", response_class=Response)
def download_output(run_id: str, reader: ReaderDep, path: str) -> Response:
    """One output file, as a download."""
    record = visible_run(run_id, reader)
    # Only a path the listing holds is read: nothing else of the store can be named here.
    if path not in _outputs(record):
        raise HTTPException(404, f"Run {run_id} has no output {path!r}.")
    data = workspace().store.get_object(f"runs/{run_id}/outputs/{path}")
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": params.attachment(path.rsplit("/", 1)[-1])},
    )


def _json(content: Any) -> Response:
    """A JSON answer encoded at once by msgspec: the route's response_model documents it, unvalidated again.

    Pages ask for lists of hundreds of runs and charts of thousands of points; validating and encoding them
    through pydantic took longer than reading them.
    """
    return Response(msgspec.json.encode(content), media_type="application/json")


def _outputs(record: RunRecord) -> list[str]:

    if record.outputs_uri is None:
        return []
    return workspace().store.list(f"runs/{record.id}/outputs")


def _snapshot(record: RunRecord) -> Any:
    from airflow_amlrun.snapshot.errors import SnapshotNotFoundError

    if record.snapshot_id is None:
        if history().child_runs(record.id):
            # A sweep's parent run runs no code: its runs, each started from a snapshot of its own, do.
            raise HTTPException(
                404,
                f"Run {record.id} is a sweep: it runs no code of its own, so it has no snapshot. Each of its runs "
                "has one: open one of them (the sweep's runs are listed on its page).",
            )
        raise HTTPException(404, f"Run {record.id} has no code snapshot (it was not started).")
    try:
        return workspace().store.get_manifest(record.snapshot_id)
    except SnapshotNotFoundError:
        raise HTTPException(404, f"Run {record.id}'s code snapshot is no longer in the store.") from None


def _entry(snapshot: Any, path: str) -> SnapshotEntry | None:
    return next((e for e in snapshot.entries if e.path == path), None)


def _text(entry: SnapshotEntry) -> str | None:
    """A file of a snapshot as text; None if it is not UTF-8 text or too large (which is not read at all)."""
    from airflow_amlrun.snapshot.diff import TEXT_LIMIT, as_text

    if entry.link is not None:
        return f"symbolic link to {entry.link}\n"
    if entry.digest is None or entry.size > TEXT_LIMIT:
        return None
    return as_text(workspace().store.get_bytes(entry.digest))


def _listed(run: RunListItem | RunRecord) -> dict[str, Any]:
    duration = None
    if run.start is not None and run.end is not None:
        duration = round((run.end - run.start).total_seconds(), 3)
    return {
        "run_id": run.id,
        "experiment": run.experiment,
        "status": str(run.status),
        "target": run.target,
        "created_at": run.created_at,
        "start": run.start,
        "end": run.end,
        "duration_seconds": duration,
        "airflow": {
            "dag_id": run.dag_id,
            "task_id": run.task_id,
            "run_id": run.airflow_run_id,
            "map_index": run.map_index,
            "try_number": getattr(run, "try_number", None),
        },
        "parameters": parameters(run.arguments),
        "tags": run.tags,
        "metrics": run.metrics,
    }


def _series(series: Series) -> dict[str, Any]:
    return {
        "name": series.name,
        "x": series.x,
        "values": series.values,
        "points": series.points,
        "sampled": series.sampled,
    }


def _differing(values: list[dict[str, Any]]) -> list[str]:
    names = sorted({k for v in values for k in v})
    return [n for n in names if len({repr(v.get(n)) for v in values}) > 1]
