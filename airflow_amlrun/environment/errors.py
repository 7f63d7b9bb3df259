"""Exceptions of environments: each carries what the user needs to fix the spec, the lock or the build."""

from __future__ import annotations

from collections.abc import Sequence

from airflow_amlrun.errors import AmlRunError, ConfigurationError


class EnvironmentNotFoundError(ConfigurationError, LookupError):
    """No registered or curated environment has the requested name, version or label."""


class LockResolutionError(ConfigurationError):
    """The resolver found no set of versions satisfying the requirements; carries its own explanation.

    :param requirements: the requirements the resolver names in its message (all of them if it names none).
    :param resolver_output: what the resolver printed, unchanged.
    """

    def __init__(self, message: str, *, requirements: Sequence[str], resolver_output: str) -> None:
        super().__init__(message)
        self.requirements = list(requirements)
        self.resolver_output = resolver_output


class EnvironmentBuildError(AmlRunError):
    """Building an environment's virtualenv failed; carries the build key and the builder's output."""

    def __init__(self, message: str, *, build_key: str, output: str) -> None:
        super().__init__(message)
        self.build_key = build_key
        self.output = output
