"""Unpacking what a remote host sends back: what the data filter refuses, and a stream cut short."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from airflow_amlrun.targets.files import extract_tar_stream


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def file_member(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link_member(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_a_member_the_filter_refuses_is_named_and_the_others_are_kept(tmp_path: Path) -> None:
    data = tar_of(
        [
            (file_member("outputs/a.txt"), b"a"),
            (link_member("outputs/escape", "/etc/passwd"), b""),
            (file_member("outputs/b.txt"), b"b"),
        ]
    )
    skipped: list[tuple[str, str]] = []
    extract_tar_stream(io.BytesIO(data), tmp_path, lambda name, why: skipped.append((name, why)))
    assert (tmp_path / "outputs/a.txt").read_bytes() == b"a"
    assert (tmp_path / "outputs/b.txt").read_bytes() == b"b"
    assert not (tmp_path / "outputs/escape").exists()
    assert [name for name, _ in skipped] == ["outputs/escape"]
    assert "absolute" in skipped[0][1] or "outside" in skipped[0][1]


def test_members_skipped_before_a_stream_breaks_are_named_before_the_error(tmp_path: Path) -> None:
    data = tar_of(
        [
            (link_member("outputs/escape", "/etc/passwd"), b""),
            (file_member("outputs/big.bin"), b"x" * 100_000),
        ]
    )
    skipped: list[str] = []
    with pytest.raises(tarfile.TarError):
        extract_tar_stream(io.BytesIO(data[:3000]), tmp_path, lambda name, why: skipped.append(name))
    # The refused link is named as it comes; the file cut short is named too, then the stream's end fails.
    assert skipped == ["outputs/escape", "outputs/big.bin"]
