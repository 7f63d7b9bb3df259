"""Registered models: numbered versions of a name, each the manifest of a run's output files, with tags,
properties, labels that move between versions (``production``), and what the run was (its metrics,
snapshot, environment and git), copied when the version is registered."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.history.records import aware
from airflow_amlrun.history.repository import RunHistory, utcnow
from airflow_amlrun.history.tables import model_labels, models

_REGISTER_ATTEMPTS = 5


class ModelNotFoundError(AmlRunError, LookupError):
    """No registered model (version, label) of that name.

    The message lists what there is. ``amlrun models list`` shows the models; a run registers one with
    ``run.register_model(name, path)``, and a label is set with ``Model.set_label``.
    """


@dataclass(frozen=True)
class ModelRecord:
    """One registered version of a model, as the history holds it."""

    name: str
    version: int
    run_id: str
    path: str
    snapshot_id: str
    tags: dict[str, Any]
    properties: dict[str, Any]
    run_info: dict[str, Any]
    labels: list[str]
    created_at: datetime


def add_version(
    history: RunHistory,
    *,
    name: str,
    run_id: str,
    path: str,
    snapshot_id: str,
    tags: dict[str, Any],
    properties: dict[str, Any],
    run_info: dict[str, Any],
) -> ModelRecord:
    """Register the next version of ``name``; concurrent registrations of a name get distinct numbers."""
    for _attempt in range(_REGISTER_ATTEMPTS):
        try:
            with history.transaction() as connection:
                last = connection.scalar(select(func.max(models.c.version)).where(models.c.name == name))
                values = {
                    "name": name,
                    "version": (last or 0) + 1,
                    "run_id": run_id,
                    "path": path,
                    "snapshot_id": snapshot_id,
                    "tags": tags,
                    "properties": properties,
                    "run_info": run_info,
                    "created_at": utcnow(),
                }
                connection.execute(insert(models).values(values))
                return _record(connection, values)
        except IntegrityError:
            continue  # another process took this number at the same moment: number after it
    raise RuntimeError(
        f"Could not register model {name!r}: {_REGISTER_ATTEMPTS} concurrent registrations collided. Try again."
    )


def get_version(
    history: RunHistory, name: str, *, version: int | None = None, label: str | None = None
) -> ModelRecord:
    """A version by number, by label, or the latest."""
    with history.transaction() as connection:
        if label is not None:
            version = connection.scalar(
                select(model_labels.c.version).where(
                    model_labels.c.name == name, model_labels.c.label == label
                )
            )
            if version is None:
                labels = connection.scalars(
                    select(model_labels.c.label).where(model_labels.c.name == name)
                ).all()
                raise ModelNotFoundError(
                    f"Model {name!r} has no label {label!r} (labels: {', '.join(sorted(labels)) or 'none'}). "
                    f"Set one with Model(ws, {name!r}, version=N).set_label({label!r})."
                )
        query = select(models).where(models.c.name == name)
        if version is not None:
            query = query.where(models.c.version == version)
        row = connection.execute(query.order_by(models.c.version.desc()).limit(1)).first()
        if row is None:
            versions = connection.scalars(select(models.c.version).where(models.c.name == name)).all()
            what = f"version {version}" if version is not None else "version"
            raise ModelNotFoundError(
                f"Model {name!r} has no {what} in this workspace"
                + (f" (versions: {', '.join(map(str, sorted(versions)))})." if versions else ".")
                + " Register one with run.register_model(name, path)."
            )
        return _record(connection, row._mapping)


def version_from_run(history: RunHistory, name: str, run_id: str, path: str) -> ModelRecord | None:
    """The earliest version of ``name`` registered from this run's output ``path``, if any."""
    with history.transaction() as connection:
        row = connection.execute(
            select(models)
            .where(models.c.name == name, models.c.run_id == run_id, models.c.path == path)
            .order_by(models.c.version)
            .limit(1)
        ).first()
        return _record(connection, row._mapping) if row is not None else None


def list_versions(history: RunHistory, name: str | None = None) -> list[ModelRecord]:
    """Every version of one model, newest first; or the latest version of every model, by name."""
    with history.transaction() as connection:
        if name is not None:
            rows = connection.execute(
                select(models).where(models.c.name == name).order_by(models.c.version.desc())
            ).all()
        else:
            latest = (
                select(models.c.name, func.max(models.c.version).label("version"))
                .group_by(models.c.name)
                .subquery()
            )
            rows = connection.execute(
                select(models)
                .join(latest, (models.c.name == latest.c.name) & (models.c.version == latest.c.version))
                .order_by(models.c.name)
            ).all()
        return [_record(connection, row._mapping) for row in rows]


def update_tags(
    history: RunHistory, name: str, version: int, *, add: dict[str, Any], remove: list[str]
) -> ModelRecord:
    """Set and remove tags of one version, in one transaction."""
    with history.transaction() as connection:
        row = _row(connection, name, version)
        kept = {k: v for k, v in (row.tags or {}).items() if k not in remove}
        tags = {**kept, **add}
        if tags != row.tags:
            connection.execute(update(models).where(models.c.id == row.id).values(tags=tags))
        return _record(connection, {**row._mapping, "tags": tags})


def set_label(history: RunHistory, name: str, version: int, label: str) -> None:
    """Point ``label`` at one version; it moves if it named another."""
    for _attempt in range(_REGISTER_ATTEMPTS):
        with history.transaction() as connection:
            _row(connection, name, version)
            expected = connection.scalar(
                select(model_labels.c.version).where(
                    model_labels.c.name == name, model_labels.c.label == label
                )
            )
        if move_label(history, name, label, version, expected=expected):
            return
    raise RuntimeError(f"Could not set label {label!r} of model {name!r}: it kept moving. Try again.")


def move_label(history: RunHistory, name: str, label: str, version: int, *, expected: int | None) -> bool:
    """Point ``label`` at ``version`` only if it still names ``expected`` (None: no version yet); False when
    another process moved it in the meantime, so that the caller can decide again."""
    try:
        with history.transaction() as connection:
            if expected is None:
                connection.execute(
                    insert(model_labels).values(name=name, label=label, version=version, updated_at=utcnow())
                )
                return True
            moved = connection.execute(
                update(model_labels)
                .where(
                    model_labels.c.name == name,
                    model_labels.c.label == label,
                    model_labels.c.version == expected,
                )
                .values(version=version, updated_at=utcnow())
            )
            return bool(moved.rowcount == 1)
    except IntegrityError:
        return False  # created by another process first


def _row(connection: Connection, name: str, version: int) -> Row[Any]:
    row = connection.execute(select(models).where(models.c.name == name, models.c.version == version)).first()
    if row is None:
        raise ModelNotFoundError(f"Model {name!r} has no version {version}.")
    return row


def _record(connection: Connection, row: Mapping[Any, Any]) -> ModelRecord:
    """The record of a version's columns (by name), with its labels."""
    labels = connection.scalars(
        select(model_labels.c.label).where(
            model_labels.c.name == row["name"], model_labels.c.version == row["version"]
        )
    ).all()
    return ModelRecord(
        name=row["name"],
        version=row["version"],
        run_id=row["run_id"],
        path=row["path"],
        snapshot_id=row["snapshot_id"],
        tags=dict(row["tags"] or {}),
        properties=dict(row["properties"] or {}),
        run_info=dict(row["run_info"] or {}),
        labels=sorted(labels),
        created_at=aware(row["created_at"]) or utcnow(),
    )
