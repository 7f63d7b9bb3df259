"""Package-index credentials: written as ``${VAR}`` in a spec, expanded only where a resolver or installer runs.

An environment's index URLs may need a password or token (``https://user:${TOKEN}@host/simple``). The
spec, its hash, the registry row, the lock, the lock blob and every build recipe keep the ``${VAR}``
reference as written, so a token never lands in the run history or an image, and rotating it changes no
environment version. The value is read from the worker's environment at the moment a resolver or an
installer needs it, and handed to that process only through its own environment: ``uv`` and ``pip``
expand ``${VAR}`` in requirements files (the lock) themselves.

A password written in clear in a URL is refused, with a message that says how to write it instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from airflow_amlrun.errors import ConfigurationError

# The only form pip and uv expand in requirements files: ${NAME}, with an upper-case POSIX name for pip.
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BARE_REFERENCE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_URL = re.compile(r"^(https?|file)://\S+$")


def check_index_url(value: object, *, where: str, option: str) -> str:
    """An index URL as it may be stored: a valid URL whose password, if any, is a ``${VAR}`` reference.

    :param value: the URL as the user wrote it.
    :param where: what holds it, for messages (``Environment 'x': python``).
    :param option: the option's name, for messages (``index_url``).
    """
    if not isinstance(value, str):
        raise ConfigurationError(f"{where}: {option} {value!r} must be a string URL.")
    url = value.strip()
    shown = redact(url)
    if not _URL.match(url):
        raise ConfigurationError(f"{where}: {option} {shown!r} is not an http(s):// or file:// URL.")
    bare = [name for name in _BARE_REFERENCE.findall(_REFERENCE.sub("", url))]
    if bare:
        raise ConfigurationError(
            f"{where}: {option} {shown!r} refers to ${bare[0]}, which pip and uv do not expand; write it as "
            f"${{{bare[0]}}}."
        )
    password = _password(url)
    if password is not None and not _REFERENCE.fullmatch(password):
        raise ConfigurationError(
            f"{where}: {option} {shown!r} carries a password in clear, which would be stored with the "
            "environment and baked into its builds. Write it as a reference to a variable, e.g. "
            "https://user:${INDEX_TOKEN}@host/simple, and set INDEX_TOKEN in the environment of the "
            "workers (and of the process that registers the environment)."
        )
    return url


def referenced_variables(urls: Iterable[str | None]) -> list[str]:
    """Names of the ``${VAR}`` references in the given URLs, in order of first appearance."""
    names: list[str] = []
    for url in urls:
        for name in _REFERENCE.findall(url or ""):
            if name not in names:
                names.append(name)
    return names


def credential_values(
    names: Iterable[str], *, what: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The values of the referenced variables from this process's environment; a missing one is an error.

    :param names: variable names, from ``referenced_variables``.
    :param what: what needs them, for the message (``resolving environment 'x'``).
    :param environ: where to read them; default ``os.environ``.
    """
    source = os.environ if environ is None else environ
    missing = [name for name in names if not source.get(name)]
    if missing:
        listed = ", ".join(f"${{{name}}}" for name in missing)
        raise ConfigurationError(
            f"{what} needs {listed} for its package index, but {'it is' if len(missing) == 1 else 'they are'} "
            "not set in this process's environment. Set the variable on every worker (and on the process "
            "that registers the environment), e.g. in the worker's service environment or Airflow's "
            "deployment secrets."
        )
    return {name: source[name] for name in names}


def expand(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``${VAR}`` in ``values`` replaced by its value (for a process's environment only)."""
    return _REFERENCE.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def redact(url: str) -> str:
    """The URL with a clear-text password replaced by ``***``, for messages."""
    password = _password(url)
    if password is None or _REFERENCE.fullmatch(password):
        return url
    scheme, _, rest = url.partition("://")
    userinfo, _, host = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _password(url: str) -> str | None:
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None
    userinfo, at, _ = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1]
