"""The names in a store: the keys callers give (checked to stay inside it), and the temporary names a write
lands under before it is renamed into place, which no listing shows and no reader takes for an object."""

from __future__ import annotations

import os
import secrets

from airflow_amlrun.snapshot.errors import InvalidKeyError

TMP_PREFIX = ".amlrun-tmp-"


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """``key`` (a prefix's slashes stripped when ``allow_empty``) if it is a relative path inside the store;
    else :class:`InvalidKeyError`."""
    key = key.strip("/") if allow_empty else key
    if not key and allow_empty:
        return ""
    parts = key.split("/")
    if not key or key.startswith("/") or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise InvalidKeyError(
            f"Store key {key!r} must be a relative path without '.', '..' or empty components."
        )
    return key


def tmp_name(final: str) -> str:
    """A fresh temporary name beside ``final`` (a path or an fsspec path) to write it under."""
    head, tail = os.path.split(final)
    return os.path.join(head, f"{TMP_PREFIX}{secrets.token_hex(8)}-{tail}")
