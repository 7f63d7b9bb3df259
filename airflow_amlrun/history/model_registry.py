"""Registered models: numbered versions of a name, each the manifest of a run's output files, with tags,
properties, labels that move between versions (``production``), and what the run was (its metrics,
snapshot, environment and git), copied when the version is registered."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, UniqueConstraint, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.history.models import Base
from airflow_amlrun.history.records import aware
from airflow_amlrun.history.repository import RunHistory, utcnow

_REGISTER_ATTEMPTS = 5


class ModelNotFoundError(AmlRunError, LookupError):
    """No registered model (version, label) of that name.

    The message lists what there is. ``amlrun models list`` shows the models; a run registers one with
    ``run.register_model(name, path)``, and a label is set with ``Model.set_label``.
    """


class ModelVersionRow(Base):
    __tablename__ = "amlrun_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str] = mapped_column(String(128), index=True)
    # The path in the run's outputs the model was registered from, as given ("outputs/model.pkl").
    path: Mapped[str] = mapped_column(String(1024))
    # The manifest of its files in the workspace store, content-addressed as code snapshots are.
    snapshot_id: Mapped[str] = mapped_column(String(64))
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    properties: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # What the run was when the model was registered: experiment, target, metrics, code snapshot,
    # environment, git.
    run_info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("name", "version", name="uq_amlrun_models_name_version"),)


class ModelLabelRow(Base):
    __tablename__ = "amlrun_model_labels"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


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
            with history.session() as session:
                last = session.scalar(
                    select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name)
                )
                row = ModelVersionRow(
                    name=name,
                    version=(last or 0) + 1,
                    run_id=run_id,
                    path=path,
                    snapshot_id=snapshot_id,
                    tags=tags,
                    properties=properties,
                    run_info=run_info,
                    created_at=utcnow(),
                )
                session.add(row)
                session.flush()
                return _record(session, row)
        except IntegrityError:
            continue  # another process took this number at the same moment: number after it
    raise RuntimeError(
        f"Could not register model {name!r}: {_REGISTER_ATTEMPTS} concurrent registrations collided. Try again."
    )


def get_version(
    history: RunHistory, name: str, *, version: int | None = None, label: str | None = None
) -> ModelRecord:
    """A version by number, by label, or the latest."""
    with history.session() as session:
        if label is not None:
            version = session.scalar(
                select(ModelLabelRow.version).where(ModelLabelRow.name == name, ModelLabelRow.label == label)
            )
            if version is None:
                labels = session.scalars(select(ModelLabelRow.label).where(ModelLabelRow.name == name)).all()
                raise ModelNotFoundError(
                    f"Model {name!r} has no label {label!r} (labels: {', '.join(sorted(labels)) or 'none'}). "
                    f"Set one with Model(ws, {name!r}, version=N).set_label({label!r})."
                )
        query = select(ModelVersionRow).where(ModelVersionRow.name == name)
        if version is not None:
            query = query.where(ModelVersionRow.version == version)
        row = session.scalar(query.order_by(ModelVersionRow.version.desc()).limit(1))
        if row is None:
            versions = session.scalars(
                select(ModelVersionRow.version).where(ModelVersionRow.name == name)
            ).all()
            what = f"version {version}" if version is not None else "version"
            raise ModelNotFoundError(
                f"Model {name!r} has no {what} in this workspace"
                + (f" (versions: {', '.join(map(str, sorted(versions)))})." if versions else ".")
                + " Register one with run.register_model(name, path)."
            )
        return _record(session, row)


def version_from_run(history: RunHistory, name: str, run_id: str, path: str) -> ModelRecord | None:
    """The earliest version of ``name`` registered from this run's output ``path``, if any."""
    with history.session() as session:
        row = session.scalar(
            select(ModelVersionRow)
            .where(
                ModelVersionRow.name == name, ModelVersionRow.run_id == run_id, ModelVersionRow.path == path
            )
            .order_by(ModelVersionRow.version)
            .limit(1)
        )
        return _record(session, row) if row is not None else None


def list_versions(history: RunHistory, name: str | None = None) -> list[ModelRecord]:
    """Every version of one model, newest first; or the latest version of every model, by name."""
    with history.session() as session:
        if name is not None:
            rows = session.scalars(
                select(ModelVersionRow)
                .where(ModelVersionRow.name == name)
                .order_by(ModelVersionRow.version.desc())
            ).all()
        else:
            latest = (
                select(ModelVersionRow.name, func.max(ModelVersionRow.version).label("version"))
                .group_by(ModelVersionRow.name)
                .subquery()
            )
            rows = session.scalars(
                select(ModelVersionRow)
                .join(
                    latest,
                    (ModelVersionRow.name == latest.c.name) & (ModelVersionRow.version == latest.c.version),
                )
                .order_by(ModelVersionRow.name)
            ).all()
        return [_record(session, row) for row in rows]


def update_tags(
    history: RunHistory, name: str, version: int, *, add: dict[str, Any], remove: list[str]
) -> ModelRecord:
    """Set and remove tags of one version, in one transaction."""
    with history.session() as session:
        row = _row(session, name, version)
        tags = {k: v for k, v in (row.tags or {}).items() if k not in remove}
        row.tags = {**tags, **add}
        session.flush()
        return _record(session, row)


def set_label(history: RunHistory, name: str, version: int, label: str) -> None:
    """Point ``label`` at one version; it moves if it named another."""
    for _attempt in range(_REGISTER_ATTEMPTS):
        with history.session() as session:
            _row(session, name, version)
            current = session.get(ModelLabelRow, (name, label))
            expected = current.version if current is not None else None
        if move_label(history, name, label, version, expected=expected):
            return
    raise RuntimeError(f"Could not set label {label!r} of model {name!r}: it kept moving. Try again.")


def move_label(history: RunHistory, name: str, label: str, version: int, *, expected: int | None) -> bool:
    """Point ``label`` at ``version`` only if it still names ``expected`` (None: no version yet); False when
    another process moved it in the meantime, so that the caller can decide again."""
    try:
        with history.session() as session:
            if expected is None:
                session.add(ModelLabelRow(name=name, label=label, version=version, updated_at=utcnow()))
                session.flush()
                return True
            moved = session.execute(
                update(ModelLabelRow)
                .where(
                    ModelLabelRow.name == name,
                    ModelLabelRow.label == label,
                    ModelLabelRow.version == expected,
                )
                .values(version=version, updated_at=utcnow())
            )
            return bool(getattr(moved, "rowcount", 0) == 1)
    except IntegrityError:
        return False  # created by another process first


def _row(session: Session, name: str, version: int) -> ModelVersionRow:
    row = session.scalar(
        select(ModelVersionRow).where(ModelVersionRow.name == name, ModelVersionRow.version == version)
    )
    if row is None:
        raise ModelNotFoundError(f"Model {name!r} has no version {version}.")
    return row


def _record(session: Session, row: ModelVersionRow) -> ModelRecord:
    labels = session.scalars(
        select(ModelLabelRow.label).where(
            ModelLabelRow.name == row.name, ModelLabelRow.version == row.version
        )
    ).all()
    return ModelRecord(
        name=row.name,
        version=row.version,
        run_id=row.run_id,
        path=row.path,
        snapshot_id=row.snapshot_id,
        tags=dict(row.tags or {}),
        properties=dict(row.properties or {}),
        run_info=dict(row.run_info or {}),
        labels=sorted(labels),
        created_at=aware(row.created_at) or utcnow(),
    )
