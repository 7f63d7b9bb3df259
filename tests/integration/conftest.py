"""Fixtures shared by the integration test modules: the SSH test host (one per session, whichever module
asks first)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.sshd_host import SshdHost, host_for_tests


@pytest.fixture(scope="session")
def ssh_host() -> Iterator[SshdHost]:
    """The remote VM: sshd in a network namespace with its own address, user and host key."""
    host = host_for_tests(user="amlrun-remote", subnet=0)
    try:
        yield host
    finally:
        host.stop()
