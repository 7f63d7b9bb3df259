"""A workspace's environment registry: versions with their locks, labels, and the curated environments."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from airflow_amlrun.environment.errors import EnvironmentNotFoundError
from airflow_amlrun.environment.lock import default_uv_cache, resolve_lock
from airflow_amlrun.environment.sections import check_environment_name
from airflow_amlrun.errors import ConfigurationError, shown
from airflow_amlrun.history.repository import utcnow
from airflow_amlrun.history.tables import environment_labels, environments

if TYPE_CHECKING:
    from airflow_amlrun.environment.spec import Environment
    from airflow_amlrun.history import RunHistory


class RegistryHost(Protocol):
    """What the registry needs of a workspace: the run history whose database holds the registry, and the
    cache folder where locks are resolved. A Workspace is one; the environment core needs no more of it."""

    @property
    def history(self) -> RunHistory: ...

    @property
    def cache_dir(self) -> Path: ...


# "latest" always means the highest version; it cannot be set as a label.
LATEST = "latest"
_REGISTER_ATTEMPTS = 5


@dataclass(frozen=True)
class StoredEnvironment:
    """One registered version: its spec (name and version set) and its lock (None when user-managed)."""

    spec: Environment
    lock: str | None


# curated environments


# Versions are numbered by the registry: "1", "2", ...
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def check_call(
    call: str, workspace: object, name: object, version: object = None, label: object = None
) -> None:
    """Refuse the arguments of a registry call (``Environment.get`` and the like) that cannot name anything."""
    # Looked up on the class: reading a workspace's history property would open its database.
    if not hasattr(type(workspace), "history"):
        raise ConfigurationError(
            f"{call}: workspace must be a Workspace (e.g. Workspace.get()), not {type(workspace).__name__} "
            f"{shown(workspace)}."
        )
    if name is not None:
        check_environment_name(name, f"{call}: name")
    if version is not None and (
        isinstance(version, bool)
        or not isinstance(version, str | int)
        or not _VERSION.fullmatch(str(version))
    ):
        raise ConfigurationError(
            f"{call}: version {shown(version)} must be a version number such as '2', or None for the latest."
        )
    if label is not None and not isinstance(label, str):
        raise ConfigurationError(f"{call}: label {shown(label)} must be a string such as 'production'.")


def _curated_dir() -> Path:
    return Path(str(resources.files("airflow_amlrun.environment").joinpath("curated")))


@functools.cache
def _curated_specs() -> dict[str, dict[str, Any]]:
    # Parsed once per process; each lookup builds a fresh Environment, as callers may change it.
    import yaml

    specs: dict[str, dict[str, Any]] = {}
    for path in sorted(_curated_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        data.pop("version", None)
        specs[str(data["name"])] = data
    return specs


def curated_names() -> list[str]:
    """Names of the environments that ship with airflow-amlrun and need no registering."""
    return sorted(_curated_specs())


def curated_environment(model: type[Environment], name: str) -> Environment | None:
    """The shipped spec of a curated environment (unregistered, no version), or None.

    :param model: the Environment class to make it with (the registry stores specs; the model is theirs).
    :param name: environment name.
    """
    data = _curated_specs().get(name)
    return None if data is None else model.from_dict(data)


# registering


def register(workspace: RegistryHost, spec: Environment) -> StoredEnvironment:
    """Store a spec as a version of its name, resolving its lock; an identical spec returns its version.

    :param workspace: the workspace.
    :param spec: the environment.
    """
    if spec.name in _curated_specs():
        curated = curated_environment(type(spec), spec.name)
        if curated is None or curated.spec_hash() != spec.spec_hash():
            raise ConfigurationError(
                f"Environment name {spec.name!r} belongs to a curated environment shipped with "
                f"airflow-amlrun (curated: {', '.join(curated_names())}). Register your changed copy under a "
                "name of your own, e.g. env.copy(name='my-" + spec.name.removeprefix("amlrun-") + "')."
            )
    return _register(workspace, spec)


def _register(workspace: RegistryHost, spec: Environment) -> StoredEnvironment:
    spec.validate()
    digest = spec.spec_hash()
    with workspace.history.transaction() as connection:
        row = _row_by_hash(connection, spec.name, digest)
        if row is not None:
            return _stored(type(spec), row)
    # Resolving takes seconds and needs the network: do it outside any transaction.
    lock = resolve_lock(spec, uv_cache_dir=default_uv_cache(workspace.cache_dir))
    for _attempt in range(_REGISTER_ATTEMPTS):
        try:
            with workspace.history.transaction() as connection:
                row = _row_by_hash(connection, spec.name, digest)
                if row is not None:
                    return _stored(type(spec), row)
                last = connection.scalar(
                    select(func.max(environments.c.seq)).where(environments.c.name == spec.name)
                )
                seq = (last or 0) + 1
                stored = spec.copy(version=str(seq))
                connection.execute(
                    insert(environments).values(
                        name=spec.name,
                        version=str(seq),
                        seq=seq,
                        spec_hash=digest,
                        spec=stored.to_dict(),
                        lock=lock,
                        created_at=utcnow(),
                    )
                )
                return StoredEnvironment(spec=stored, lock=lock)
        except IntegrityError:
            # Another process registered this name at the same moment: read again and number after it.
            continue
    raise ConfigurationError(
        f"Could not register environment {spec.name!r}: {_REGISTER_ATTEMPTS} concurrent registrations of the "
        "same name collided. Try again."
    )


def _row_by_hash(connection: Connection, name: str, digest: str) -> Row[Any] | None:
    return connection.execute(
        select(environments).where(environments.c.name == name, environments.c.spec_hash == digest)
    ).first()


def _stored(model: type[Environment], row: Row[Any]) -> StoredEnvironment:
    spec = model.from_dict(row.spec)
    spec.version = row.version
    return StoredEnvironment(spec=spec, lock=row.lock)


# looking up


def lookup(
    model: type[Environment],
    workspace: RegistryHost,
    name: str,
    *,
    version: str | None = None,
    label: str | None = None,
) -> StoredEnvironment:
    """A version of an environment by name (latest), version or label; curated names need no registering.

    :param model: the Environment class whose instances the stored specs become.
    :param workspace: the workspace.
    :param name: environment name.
    :param version: a version number such as ``"2"``.
    :param label: a label, or ``"latest"``.
    """
    if version is not None and label is not None:
        raise ConfigurationError(
            f"Environment {name!r}: give a version ({version!r}) or a label ({label!r}), not both."
        )
    if label == LATEST:
        label = None
    curated = curated_environment(model, name)
    with workspace.history.transaction() as connection:
        if label is not None:
            version = connection.scalar(
                select(environment_labels.c.version).where(
                    environment_labels.c.name == name, environment_labels.c.label == label
                )
            )
            if version is None:
                labels = connection.scalars(
                    select(environment_labels.c.label).where(environment_labels.c.name == name)
                ).all()
                raise EnvironmentNotFoundError(
                    f"Environment {name!r} has no label {label!r} (labels: {', '.join(labels) or 'none'}). "
                    f"Set one with Environment.set_label(ws, {name!r}, version, {label!r})."
                )
        if version is not None:
            row = connection.execute(
                select(environments).where(
                    environments.c.name == name, environments.c.version == str(version)
                )
            ).first()
            if row is not None:
                return _stored(model, row)
            if curated is None:
                raise _not_found(connection, name, version)
        elif curated is None:
            row = connection.execute(
                select(environments)
                .where(environments.c.name == name)
                .order_by(environments.c.seq.desc())
                .limit(1)
            ).first()
            if row is None:
                raise _not_found(connection, name, None)
            return _stored(model, row)
    # A curated name means the spec this package ships: stored (with its lock) on first use, so a new
    # release of the package that changes it becomes the next version.
    assert curated is not None
    stored = _register(workspace, curated)
    if version is not None and stored.spec.version != str(version):
        with workspace.history.transaction() as connection:
            raise _not_found(connection, name, version)
    return stored


def _not_found(connection: Connection, name: str, version: str | None) -> EnvironmentNotFoundError:
    if version is not None:
        versions = connection.scalars(
            select(environments.c.version).where(environments.c.name == name).order_by(environments.c.seq)
        ).all()
        if versions:
            return EnvironmentNotFoundError(
                f"Environment {name!r} has no version {version!r}; its versions are {', '.join(versions)}."
            )
    registered = [
        found
        for found in connection.scalars(select(environments.c.name).distinct().order_by(environments.c.name))
        if found not in _curated_specs()
    ]
    return EnvironmentNotFoundError(
        f"No environment named {name!r} in this workspace. Registered: "
        f"{', '.join(registered) or 'none'}; curated: {', '.join(curated_names())}. Fix the name, or "
        "register it first with Environment(...).register(ws) (or pass the Environment object itself)."
    )


def list_environments(
    model: type[Environment], workspace: RegistryHost, *, name: str | None = None
) -> list[Environment]:
    """The latest version of each registered name plus the curated ones, or every version of one name.

    :param model: the Environment class whose instances the stored specs become.
    :param workspace: the workspace.
    :param name: list this name's versions, newest first.
    """
    with workspace.history.transaction() as connection:
        if name is not None:
            rows = connection.execute(
                select(environments).where(environments.c.name == name).order_by(environments.c.seq.desc())
            ).all()
            return [_stored(model, row).spec for row in rows]
        latest = (
            select(environments.c.name, func.max(environments.c.seq).label("seq"))
            .group_by(environments.c.name)
            .subquery()
        )
        rows = connection.execute(
            select(environments)
            .join(latest, (environments.c.name == latest.c.name) & (environments.c.seq == latest.c.seq))
            .order_by(environments.c.name)
        ).all()
        found = {row.name: _stored(model, row).spec for row in rows}
    for curated in curated_names():
        if curated not in found:
            spec = curated_environment(model, curated)
            assert spec is not None
            found[curated] = spec
    return [found[key] for key in sorted(found)]


def labels(workspace: RegistryHost, name: str) -> dict[str, str]:
    """The labels of environment ``name``, each with the version it points at."""
    with workspace.history.reading() as connection:
        rows = connection.execute(
            select(environment_labels.c.label, environment_labels.c.version).where(
                environment_labels.c.name == name
            )
        )
        return {label: version for label, version in rows}


def set_label(model: type[Environment], workspace: RegistryHost, name: str, version: str, label: str) -> None:
    """Point a label at one version of an environment, moving it if it named another.

    :param model: the Environment class (a curated name is registered before it is labelled).
    :param workspace: the workspace.
    :param name: environment name.
    :param version: the version.
    :param label: the label.
    """
    if version is None or label is None:
        raise ConfigurationError(
            f"Environment.set_label: give both the version ({shown(version)}) and the label ({shown(label)})."
        )
    broken = (
        "it is empty"
        if not label
        else f"{LATEST!r} always means the newest version"
        if label == LATEST
        else f"it has {len(label)} characters, more than 64"
        if len(label) > 64
        else "it holds ':' or '@'"
        if ":" in label or "@" in label
        else None
    )
    if broken is not None:
        raise ConfigurationError(
            f"Label {shown(label)} cannot be used in Environment.set_label: {broken}. A label has at most 64 "
            f"characters, without ':' or '@', and is neither empty nor {LATEST!r}."
        )
    if name in _curated_specs():
        lookup(model, workspace, name)  # so the curated version exists to be labelled
    with workspace.history.transaction() as connection:
        exists = connection.scalar(
            select(environments.c.id).where(
                environments.c.name == name, environments.c.version == str(version)
            )
        )
        if exists is None:
            raise _not_found(connection, name, str(version))
        of_label = (environment_labels.c.name == name, environment_labels.c.label == label)
        current = connection.scalar(select(environment_labels.c.version).where(*of_label))
        if current is None:
            connection.execute(
                insert(environment_labels).values(
                    name=name, label=label, version=str(version), updated_at=utcnow()
                )
            )
        else:
            connection.execute(
                update(environment_labels).where(*of_label).values(version=str(version), updated_at=utcnow())
            )
