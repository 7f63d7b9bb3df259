"""From what a run config names to what a run executes with: resolving an environment and its local build."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.build_venv import (
    build_key,
    build_venv,
    local_build_key,
    python_tag,
    venv_python,
)
from airflow_amlrun.environment.credentials import credential_values
from airflow_amlrun.environment.lock import has_requirements
from airflow_amlrun.environment.spec import Environment
from airflow_amlrun.errors import ConfigurationError

if TYPE_CHECKING:
    from airflow_amlrun.environment.registry import RegistryHost


@dataclass(frozen=True)
class ResolvedEnvironment:
    """An environment pinned for a run: its spec, version and lock, and the key of its local build.

    :param spec: the environment, version set when registered.
    :param name: environment name.
    :param version: registered version, None for an unregistered user-managed environment.
    :param lock: the lock text every build installs, None when user-managed.
    :param build_key: key of this machine's build (``<cache_dir>/envs/<build_key>``), None when user-managed.
    :param user_managed: True when the run uses an interpreter as it is.
    """

    spec: Environment
    name: str
    version: str | None
    lock: str | None
    build_key: str | None
    user_managed: bool

    def summary(self) -> dict[str, Any]:
        """What a run records of its environment (run row, XCom): JSON-serialisable."""
        return {
            "name": self.name,
            "version": self.version,
            "build_key": self.build_key,
            "python": python_tag(self.spec),
            "user_managed": self.user_managed,
            # What a Spark target passes to spark-submit, recorded with the run.
            **({"spark": self.spec.spark.to_dict()} if not self.spec.spark.empty else {}),
        }

    def credential_variables(self) -> list[str]:
        """The variables every build of the lock needs set: the ``${VAR}`` references of the index URLs and of
        the direct-URL requirements (which the lock keeps as written). Empty when nothing is installed."""
        if self.user_managed or self.lock is None or not has_requirements(self.lock):
            return []
        return self.spec.python.credential_variables()

    def index_credentials(self, *, what: str | None = None) -> dict[str, str]:
        """The values of the variables of ``credential_variables``, which every build of the lock needs.

        Read from this process's environment, to be handed to an installer's environment only (a build
        secret, a remote build's stdin), never stored or put on a command line. Empty when nothing is
        installed.

        :param what: what needs them, for the message of a missing one; default this environment's version.
        :raises ConfigurationError: a referenced variable is not set here.
        """
        return credential_values(
            self.credential_variables(), what=what or f"Environment {self.name!r} version {self.version}"
        )

    def build_key_for(self, *, python: str, platform: str) -> str | None:
        """The build key of this environment for another Python or platform (a Docker image, a cluster).

        :param python: the Python version the build runs, e.g. ``"3.11"``.
        :param platform: the platform, e.g. ``linux/amd64``.
        """
        if self.user_managed:
            return None
        return build_key(self.spec, self.lock, python=python, platform=platform)


def resolve_environment(
    workspace: RegistryHost, environment: Environment | str | None
) -> ResolvedEnvironment:
    """Pin the environment a run names: a version with its lock, registering a new spec implicitly.

    None is the worker's own interpreter (nothing to register). A string is ``name``, ``name:version``
    or ``name@label`` of a registered or curated environment. An Environment object is registered if its
    spec is new (so it gets a version and a lock), unless it is user-managed. When nothing changed this
    costs one query.

    :param workspace: the workspace whose registry to use.
    :param environment: what the run config names.
    """
    from airflow_amlrun.environment import registry

    if environment is None:
        return _user_managed(Environment())
    if isinstance(environment, str):
        name, version, label = parse_reference(environment)
        stored = registry.lookup(Environment, workspace, name, version=version, label=label)
    elif isinstance(environment, Environment):
        environment.validate()
        if environment.user_managed:
            return _user_managed(environment)
        stored = registry.register(workspace, environment)
    else:
        raise ConfigurationError(
            f"environment={environment!r} must be an Environment, the name of a registered one "
            "('name', 'name:version' or 'name@label'), or None for the worker's own interpreter."
        )
    spec = stored.spec
    if spec.user_managed:
        return _user_managed(spec)
    return ResolvedEnvironment(
        spec=spec,
        name=spec.name,
        version=spec.version,
        lock=stored.lock,
        build_key=local_build_key(spec, stored.lock),
        user_managed=False,
    )


def ensure_local_python(resolved: ResolvedEnvironment, cache_dir: str | os.PathLike[str]) -> str:
    """The interpreter to run the script with on this machine, building the environment's venv if needed.

    A build that exists costs one stat.

    :param resolved: from ``resolve_environment``.
    :param cache_dir: the workspace's cache folder (``ws.cache_dir``).
    """
    if resolved.user_managed or resolved.build_key is None or resolved.lock is None:
        return resolved.spec.local_interpreter()
    python = venv_python(cache_dir, resolved.build_key)
    if os.path.exists(python):
        return python
    return build_venv(resolved.spec, resolved.lock, resolved.build_key, cache_dir)


def index_secrets(workspace: RegistryHost, environment: Environment | str | None) -> list[str]:
    """The values, as set in this process, of the variables the environment's index URLs and direct-URL
    requirements refer to.

    For masking them in logs before a run starts. A reference that cannot be looked up, or a variable that
    is not set, gives nothing: submitting the run reports those.

    :param workspace: the workspace whose registry to use.
    :param environment: what the run config names.
    """
    from airflow_amlrun.environment import registry

    if isinstance(environment, Environment):
        names = environment.python.credential_variables()
    elif isinstance(environment, str):
        try:
            name, version, label = parse_reference(environment)
            spec = registry.lookup(Environment, workspace, name, version=version, label=label).spec
        except ConfigurationError:
            return []
        names = spec.python.credential_variables()
    else:
        return []
    return [os.environ[name] for name in names if os.environ.get(name)]


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """``(name, version, label)`` of ``name``, ``name:version`` or ``name@label``."""
    text = reference.strip()
    if "@" in text:
        name, _, label = text.partition("@")
        if name and label:
            return name, None, label
    elif ":" in text:
        name, _, version = text.partition(":")
        if name and version:
            return name, version, None
    elif text:
        return text, None, None
    raise ConfigurationError(
        f"environment={reference!r} is not an environment reference: write 'name', 'name:version' (e.g. "
        "'amlrun-sklearn:1') or 'name@label'."
    )


def _user_managed(spec: Environment) -> ResolvedEnvironment:
    return ResolvedEnvironment(
        spec=spec, name=spec.name, version=spec.version, lock=None, build_key=None, user_managed=True
    )
