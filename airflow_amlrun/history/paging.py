"""How the run list is ordered and paged: sort keys, and the opaque cursor that carries a page's last row.

Pure logic, no database. A cursor holds the sort key's value and the id of the last run shown, so the next
page starts right after that run whatever was added meanwhile (keyset paging: no offset to skip, no run
shown twice or missed when new runs come in).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from airflow_amlrun.errors import AmlRunError

# Columns of a run the list can be sorted by, and whether a run may lack a value for them.
SORT_COLUMNS = {
    "created_at": False,
    "start_time": True,
    "end_time": True,
    "status": False,
    "target": False,
    "experiment": False,
    "dag_id": True,
    "task_id": True,
    "id": False,
}
METRIC_PREFIX = "metrics."
DATETIME_COLUMNS = frozenset({"created_at", "start_time", "end_time"})


class BadListRequestError(AmlRunError, ValueError):
    """A sort key, filter or cursor of a run list request (the UI's run list API) that cannot be used.

    The message says what to send instead; a cursor of another sort order, or a damaged one, is left out to start
    again from the first page.
    """


@dataclass(frozen=True)
class RunSort:
    """The order of a run list: a column of the run or a metric's latest value, then the run id.

    Runs without a value for the key come last in either direction.
    """

    column: str | None = "created_at"
    metric: str | None = None
    descending: bool = True

    @classmethod
    def parse(cls, text: str) -> RunSort:
        """``created_at`` (ascending), ``-created_at`` (descending), ``metrics.loss``, ``-metrics.loss``."""
        descending = text.startswith("-")
        key = text.removeprefix("-")
        if key.startswith(METRIC_PREFIX) and len(key) > len(METRIC_PREFIX):
            return cls(column=None, metric=key[len(METRIC_PREFIX) :], descending=descending)
        if key not in SORT_COLUMNS:
            raise BadListRequestError(
                f"Cannot sort runs by {text!r}: sort by one of {', '.join(SORT_COLUMNS)} or by a metric as "
                "metrics.NAME, with a leading '-' for descending order (e.g. -metrics.accuracy)."
            )
        return cls(column=key, metric=None, descending=descending)

    @property
    def text(self) -> str:
        key = self.column if self.metric is None else METRIC_PREFIX + self.metric
        return f"{'-' if self.descending else ''}{key}"

    @property
    def nullable(self) -> bool:
        return self.metric is not None or SORT_COLUMNS[self.column or ""]


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last run's sort key value (None: it had none) and its id."""

    value: Any
    run_id: str


def encode_cursor(sort: RunSort, value: Any, run_id: str) -> str:
    """The cursor after a run shown with this sort key value, as URL-safe text."""
    if isinstance(value, datetime):
        value = value.isoformat()
    raw = json.dumps([sort.text, value, run_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(sort: RunSort, text: str) -> Cursor:
    """The cursor's position, checked to belong to this sort order and to hold a value of the key's type.

    A cursor is the client's to send: anything else than what `encode_cursor` wrote is refused here, before
    it reaches a query (where a list, a number too large for the database or a NUL character fails).
    """
    not_ours = BadListRequestError(
        f"The cursor {text[:80]!r} is not one this server gave out: pass the next_cursor of the previous "
        "page unchanged, or leave cursor out for the first page."
    )
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        decoded = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise not_ours from None
    if not (isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[0], str)):
        raise not_ours
    sorted_by, value, run_id = decoded
    if sorted_by != sort.text:
        raise BadListRequestError(
            f"The cursor belongs to a list sorted by {sorted_by[:80]!r}, not {sort.text!r}: page with the sort "
            "the cursor came from, or leave cursor out to start the new order from its first page."
        )
    if not _is_text(run_id) or (value is not None and _key_value(sort, value) is None):
        raise BadListRequestError(f"The cursor {text[:80]!r} is damaged: leave it out to start again.")
    return Cursor(value=None if value is None else _key_value(sort, value), run_id=run_id)


def _is_text(value: Any) -> bool:
    # Text a database takes as a parameter: PostgreSQL refuses a NUL character in a string.
    return isinstance(value, str) and "\x00" not in value


def _key_value(sort: RunSort, value: Any) -> Any:
    """The sort key's value read from a cursor, of the key's type; None if it is not one."""
    if sort.metric is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    if not _is_text(value):
        return None
    if sort.column in DATETIME_COLUMNS:
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return value


def parameters(arguments: list[Any]) -> dict[str, Any]:
    """A run's parameters read from its arguments: ``--name value`` and ``--name=value`` give name: value, a
    ``--flag`` followed by another option or nothing gives flag: True; other arguments are numbered (arg0...).
    """
    found: dict[str, Any] = {}
    words = [str(a) for a in arguments]
    position = 0
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and len(word) > 2:
            name, equals, value = word[2:].partition("=")
            if equals:
                found[name] = value
            elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                found[name] = words[i + 1]
                i += 1
            else:
                found[name] = True
        else:
            found[f"arg{position}"] = word
            position += 1
        i += 1
    return found
