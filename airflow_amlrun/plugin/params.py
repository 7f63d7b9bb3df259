"""What the run list's query parameters and a download's header are made of: parsed and checked here, so that
a bad value is a 400 naming it, never a failed query."""

from __future__ import annotations

import json
from urllib.parse import quote

from airflow_amlrun.history.listing import MetricRange
from airflow_amlrun.history.paging import BadListRequestError


def statuses(given: list[str]) -> list[str]:
    from airflow_amlrun.history import RunStatus

    known = {s.value.lower(): s.value for s in RunStatus}
    unknown = [s for s in given if s.lower() not in known]
    if unknown:
        raise BadListRequestError(
            f"Unknown status {unknown[0]!r}: use any of {', '.join(s.value for s in RunStatus)}."
        )
    return [known[s.lower()] for s in given]


def tag(text: str, dialect: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise BadListRequestError(f"tag={text!r} is not KEY=VALUE: e.g. tag=team=fraud.")
    if dialect == "sqlite" and json.dumps(key) != f'"{key}"':
        # SQLite's JSON paths name a key between double quotes, with no escapes, and compare it with the key
        # as the JSON text spells it: a key with '"', '\\', a control or a non-ASCII character cannot be named.
        raise BadListRequestError(
            f"Cannot filter on the tag {key!r} in a SQLite run history: SQLite finds tag keys of printable "
            "ASCII characters other than '\"' and '\\' only. Filter on another tag, or keep the run history "
            "on PostgreSQL."
        )
    return key, value


def metric_range(text: str) -> MetricRange:
    name, _, bounds = text.partition(":")
    low, _, high = bounds.partition(":")
    try:
        return MetricRange(name, float(low) if low else None, float(high) if high else None)
    except ValueError:
        raise BadListRequestError(
            f"metric={text!r} is not NAME:LOW:HIGH with numbers (either may be empty): e.g. metric=accuracy:0.9:"
        ) from None


def attachment(name: str) -> str:
    """A Content-Disposition for a download named `name`, whatever its characters.

    HTTP headers are Latin-1: a name beyond it goes as RFC 5987's UTF-8 ``filename*`` (what browsers use),
    beside a plain ASCII ``filename`` for older clients.
    """
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    header = f'attachment; filename="{fallback}"'
    if fallback != name:
        header += f"; filename*=UTF-8''{quote(name, safe='')}"
    return header
