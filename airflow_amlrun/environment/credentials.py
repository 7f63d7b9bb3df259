"""Package-index credentials: written as ``${VAR}`` in a spec, expanded only where a resolver or installer runs.

An environment's index URLs, and the URLs of its direct-URL requirements (``pkg @ https://...``,
``pkg @ git+https://...``), may need a password or token (``https://user:${TOKEN}@host/simple``). The spec,
its hash, the registry row, the lock, the lock blob and every build recipe keep the ``${VAR}`` reference as
written, so a token never lands in the run history or an image, and rotating it changes no environment
version. The value is read from the worker's environment at the moment a resolver or an installer needs it,
and handed to that process only through its own environment: ``uv`` and ``pip`` expand ``${VAR}`` in
requirements files (the lock), index options and direct URLs alike, themselves.

A credential written in clear in a URL is refused, with a message that hides it and says how to write it
instead. What counts as one:
- any user info that is not made of ``${VAR}`` references, except a literal user name before a ``${VAR}``
  password (``https://aws:${TOKEN}@host``). A user name alone is refused too: GitHub, Gemfury and others take
  a token there (``https://TOKEN@host``, ``https://TOKEN:@host``). Only ssh URLs (``git+ssh://git@host``) may
  name a user alone: ssh authenticates with keys, never with the user name;
- a query parameter whose name says it holds a credential (``token``, ``key``, ``signature``, ``sig``, ...)
  and whose value is not a ``${VAR}`` reference.
A secret elsewhere in a URL (a path segment) cannot be told from a name; the user writes it as ``${VAR}``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from airflow_amlrun.errors import ConfigurationError

# The only form pip and uv expand in requirements files: ${NAME}, with an upper-case POSIX name for pip.
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A part of a URL that is nothing but references (``${USER}``, ``${A}${B}``): no secret of its own.
_ONLY_REFERENCES = re.compile(r"(?:\$\{[A-Za-z_][A-Za-z0-9_]*\})+")
_BARE_REFERENCE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_URL = re.compile(r"^(https?|file)://\S+$")
# Any URL inside a line of text, for hiding its credentials in messages about the line.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+")
# Words of a query parameter's name that say it carries a credential (AWS, GCS and Azure signed URLs, tokens
# of package hosts, API keys); a name is split into words at punctuation and at camelCase.
_CREDENTIAL_WORDS = {
    "auth", "authorization", "oauth", "bearer", "jwt", "key", "apikey", "pass", "passwd", "password", "pwd",
    "secret", "session", "sig", "signature", "sas", "credential", "credentials", "token",
}  # fmt: skip
_CREDENTIAL_AFFIXES = ("token", "secret", "passw", "apikey", "signature", "credential")


@dataclass(frozen=True)
class _Parts:
    """A URL cut where credentials may sit, keeping every character as written (nothing is re-encoded)."""

    scheme: str
    userinfo: str | None
    hostport: str
    path: str
    query: str | None
    fragment: str | None

    @classmethod
    def of(cls, url: str) -> _Parts | None:
        scheme, sep, rest = url.partition("://")
        if not sep:
            return None
        # The authority ends where the path, query or fragment begins, as urlsplit (and so pip and uv) cut it.
        end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        authority, tail = rest[:end], rest[end:]
        userinfo, at, hostport = authority.rpartition("@")
        tail, hash_, fragment = tail.partition("#")
        path, question, query = tail.partition("?")
        return cls(
            scheme=scheme,
            userinfo=userinfo if at else None,
            hostport=hostport,
            path=path,
            query=query if question else None,
            fragment=fragment if hash_ else None,
        )

    def text(self, userinfo: str | None, query: str | None) -> str:
        at = f"{userinfo}@" if userinfo is not None else ""
        question = f"?{query}" if query is not None else ""
        hash_ = f"#{self.fragment}" if self.fragment is not None else ""
        return f"{self.scheme}://{at}{self.hostport}{self.path}{question}{hash_}"

    @property
    def user_and_password(self) -> tuple[str, str]:
        user, _, password = (self.userinfo or "").partition(":")
        return user, password

    def userinfo_in_clear(self) -> str | None:
        """What the user info shows in clear ("a password in clear", ...), or None if it holds no secret."""
        if self.userinfo is None:
            return None
        user, password = self.user_and_password
        if password:
            return None if _ONLY_REFERENCES.fullmatch(password) else "a password in clear"
        if not user or _ONLY_REFERENCES.fullmatch(user):
            return None
        if self.scheme == "ssh" or self.scheme.endswith("+ssh"):
            return None
        return "a user name in clear and no password, which is how GitHub, Gemfury and others take a token"

    def query_credentials_in_clear(self) -> list[str]:
        """Names of the query parameters that carry a credential in clear."""
        names = []
        for name, value in _parameters(self.query):
            if value and not _ONLY_REFERENCES.fullmatch(value) and _is_credential_name(name):
                names.append(name)
        return names

    def redacted(self) -> str:
        """The URL with every credential in clear replaced by ``***``."""
        userinfo = self.userinfo
        if userinfo is not None and self.userinfo_in_clear() is not None:
            # Which part is the secret is not known (a token may be the user name): both are hidden.
            userinfo = ":".join(
                part if not part or _ONLY_REFERENCES.fullmatch(part) else "***"
                for part in userinfo.split(":", 1)
            )
        return self.text(userinfo, self.query_with(lambda name: "***"))

    def query_with(self, value: Callable[[str], str]) -> str | None:
        """The query with the value of each parameter carrying a credential in clear replaced by ``value(name)``."""
        if self.query is None:
            return None
        hidden = set(self.query_credentials_in_clear())
        return "&".join(
            f"{name}={value(unquote(name))}" if unquote(name) in hidden else parameter
            for parameter in self.query.split("&")
            for name in [parameter.partition("=")[0]]
        )


def check_index_url(value: object, *, where: str, option: str) -> str:
    """An index URL as it may be stored: a valid URL whose credentials, if any, are ``${VAR}`` references.

    :param value: the URL as the user wrote it.
    :param where: what holds it, for messages (``Environment 'x': python``).
    :param option: the option's name, for messages (``index_url``).
    """
    if not isinstance(value, str):
        raise ConfigurationError(f"{where}: {option} {redact_text(repr(value))} must be a string URL.")
    url = value.strip()
    if not _URL.match(url):
        raise ConfigurationError(f"{where}: {option} {redact(url)!r} is not an http(s):// or file:// URL.")
    check_url_credentials(url, where=where, what=option, variable="INDEX_TOKEN")
    return url


def check_url_credentials(
    url: str, *, where: str, what: str, variable: str, shown: str | None = None
) -> None:
    """Refuse a URL that carries a credential in clear, or a ``$VAR`` that pip and uv would not expand.

    :param url: the URL as written.
    :param where: what holds it, for messages (``requirements.txt:3``).
    :param what: what the URL is, for messages (``index_url``, ``requirement``).
    :param variable: the variable name the message suggests (``INDEX_TOKEN``).
    :param shown: how to show the thing holding the URL, when it is more than the URL (a requirement); the
        URL inside it is shown redacted.
    """
    parts = _Parts.of(url)
    display = redact_text(shown if shown is not None else url)
    bare = _BARE_REFERENCE.findall(_REFERENCE.sub("", url))
    if bare:
        raise ConfigurationError(
            f"{where}: {what} {display!r} refers to ${bare[0]}, which pip and uv do not expand; write it as "
            f"${{{bare[0]}}}."
        )
    if parts is None:
        return
    try:
        urlsplit(url).port  # noqa: B018 (a port that is not a number raises)
    except ValueError:
        raise ConfigurationError(
            f"{where}: {what} {display!r} is not a valid URL: its host or port cannot be read. A password "
            "holding '/', '?', '#' or '@' must be percent-encoded, or better, be a ${VAR} reference."
        ) from None
    hidden = _Parts(parts.scheme, None, parts.hostport, parts.path, None, parts.fragment)
    where_to_set = (
        f"set {variable} in the environment of the workers (and of the process that registers the "
        "environment), e.g. in the worker's service environment or Airflow's deployment secrets"
    )
    stored = "would be stored with the environment (registry, lock) and baked into its builds and images"
    in_clear = parts.userinfo_in_clear()
    if in_clear is not None:
        query = parts.query_with(lambda name: "***")
        as_token = hidden.text(f"${{{variable}}}", query)
        as_password = hidden.text(f"NAME:${{{variable}}}", query)
        raise ConfigurationError(
            f"{where}: {what} {display!r} carries {in_clear}; written so, it {stored}. Write the secret as a "
            f"reference to a variable: {as_token} for a token, or {as_password} for a user name and a "
            f"password; then {where_to_set}."
        )
    names = parts.query_credentials_in_clear()
    if names:
        listed = ", ".join(repr(name) for name in names)
        # One variable per parameter: INDEX_TOKEN, INDEX_TOKEN_2, ...
        variables = {name: variable + (f"_{i}" if i > 1 else "") for i, name in enumerate(names, start=1)}
        example = hidden.text(parts.userinfo, parts.query_with(lambda name: f"${{{variables[name]}}}"))
        raise ConfigurationError(
            f"{where}: {what} {display!r} carries the query parameter{'s' if len(names) > 1 else ''} {listed} "
            f"in clear; written so, {'its value' if len(names) == 1 else 'their values'} {stored}. Write "
            f"{'it as a reference to a variable' if len(names) == 1 else 'them as references to variables'}: "
            f"{example}; then {where_to_set.replace(variable, ', '.join(variables.values()), 1)}."
        )


def referenced_variables(texts: Iterable[str | None]) -> list[str]:
    """Names of the ``${VAR}`` references in the given URLs or requirements, in order of first appearance."""
    names: list[str] = []
    for text in texts:
        for name in _REFERENCE.findall(text or ""):
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


def hide(text: str, values: Iterable[str]) -> str:
    """``text`` with each of the values replaced by ``***``: an installer's output may show a URL it expanded
    (uv hides a password, but not a token in a query)."""
    for value in sorted((v for v in values if v), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def redact(url: str) -> str:
    """The URL with every credential in clear (user info, credential query values) replaced by ``***``."""
    parts = _Parts.of(url)
    return url if parts is None else parts.redacted()


def redact_text(text: str) -> str:
    """A line of text (a requirement, an option line) with the credentials of every URL in it hidden."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)


def _parameters(query: str | None) -> list[tuple[str, str]]:
    if not query:
        return []
    pairs = []
    for parameter in query.split("&"):
        name, _, value = parameter.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def _is_credential_name(name: str) -> bool:
    # X-Amz-Signature -> x amz signature; AWSAccessKeyId -> aws access key id; private_token -> private token.
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name))
    words = re.findall(r"[a-z0-9]+", spaced.lower())
    return any(
        word in _CREDENTIAL_WORDS
        or word.startswith(_CREDENTIAL_AFFIXES)
        or word.endswith(_CREDENTIAL_AFFIXES)
        for word in words
    )
