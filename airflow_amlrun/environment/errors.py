"""Exceptions of environments: each carries what the user needs to fix the spec, the lock or the build."""

from __future__ import annotations

from collections.abc import Sequence

from airflow_amlrun.errors import AmlRunError, ConfigurationError


class EnvironmentNotFoundError(ConfigurationError, LookupError):
    """No registered or curated environment has the requested name, version or label; nothing has run.

    The message lists what there is. ``amlrun envs list`` shows the environments and their versions; register the
    environment first, or set the label (``Environment.set_label``).
    """


class LockResolutionError(ConfigurationError):
    """The resolver found no set of versions satisfying the requirements (or the index did not answer in time);
    carries its own explanation, and nothing was registered.

    Fix the requirement's name or relax its version constraint, check that the package index has it (and is
    reachable from here), then register the environment again.

    :param requirements: the requirements the resolver names in its message (all of them if it names none).
    :param resolver_output: what the resolver printed, unchanged.
    """

    def __init__(self, message: str, *, requirements: Sequence[str], resolver_output: str) -> None:
        super().__init__(message)
        self.requirements = list(requirements)
        self.resolver_output = resolver_output


class EnvironmentBuildError(AmlRunError):
    """Building an environment (its virtualenv, image or archive) failed; carries the build key and the builder's
    output.

    The output says why (a package that does not build on this platform, an index that refuses, a full disk): fix
    that, then submit again, or build the environment ahead of its runs with ``amlrun envs build``.
    """

    def __init__(self, message: str, *, build_key: str, output: str) -> None:
        super().__init__(message)
        self.build_key = build_key
        self.output = output
