"""A "remote VM" for tests and benchmarks: sshd in a network namespace of its own, reached over a veth pair.

The namespace has its own address (10.231.x.2/30, the worker side is 10.231.x.1), its own host key and a
login user of its own (shell /bin/sh, so no rc file slows every command down), and its link can be cut
and restored like a real network's. Needs root (ip netns, useradd, sshd): `host_for_tests` fails the test
run, saying what is missing, rather than letting the SSH tests pass unseen as skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"
# What setting up a host needs besides root, and the Debian package that brings it.
TOOLS = {
    "ip": "iproute2",
    "ssh-keygen": "openssh-client",
    SSHD: "openssh-server",
    "useradd": "passwd",
    "nsenter": "util-linux",
    "ss": "iproute2",
}


@dataclass
class SshdHost:
    """The running host: where it is, who logs in, and the files a connection needs."""

    namespace: str
    link: str  # the worker side of the veth pair
    address: str
    worker_address: str  # this machine's end of the link, as the host reaches it
    port: int
    user: str
    home: Path
    workdir: Path
    key_file: Path
    known_hosts: Path
    created_user: bool

    def connection(self, **extra: Any) -> str:
        """An Airflow connection (JSON form, for AIRFLOW_CONN_<ID>) to this host, with extras added."""
        return json.dumps(
            {
                "conn_type": "ssh",
                "host": self.address,
                "port": self.port,
                "login": self.user,
                "extra": {"key_file": str(self.key_file), "known_hosts": str(self.known_hosts), **extra},
            }
        )

    def run(self, *command: str) -> None:
        """Run a command as root on the host, in sshd's own mount namespace (`ip netns exec` gave it one:
        a file system mounted from outside would not show there)."""
        pid = (self.workdir / "sshd.pid").read_text().strip()
        _run("nsenter", "--mount", "--net", "--target", pid, *command)

    def cut(self) -> None:
        """Take the network link down: packets to and from the host are lost until `restore`."""
        _run("ip", "link", "set", self.link, "down")

    def restore(self) -> None:
        _run("ip", "link", "set", self.link, "up")

    def stop(self) -> None:
        """End what the host started, and only that: the processes of its network namespace (sshd and all
        it started, runs the tests left behind included), and, for a login user it created, every process
        of that user. A user that existed before keeps its other processes."""
        _stop_namespace(self.namespace, self.link)
        if self.created_user:
            uid = pwd.getpwnam(self.user).pw_uid
            for proc in Path("/proc").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    if proc.name.isdigit() and proc.stat().st_uid == uid:
                        os.kill(int(proc.name), signal.SIGKILL)
            subprocess.run(["userdel", "-r", self.user], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def missing_prerequisites() -> list[str]:
    """What this machine lacks to set up a host, each with how to get it; empty when nothing is missing."""
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()}; ip netns, useradd and sshd need root)")
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install -y {package}, or `make services`)")
    return missing


def host_for_tests(**options: Any) -> SshdHost:
    """start_sshd_host for a test session: anything that keeps the host from starting fails the tests
    loudly, naming what is missing or what failed, instead of skipping them."""
    import pytest

    missing = missing_prerequisites()
    if missing:
        pytest.fail("The SSH tests cannot set up their host; missing: " + "; ".join(missing), pytrace=False)
    try:
        return start_sshd_host(**options)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        pytest.fail(f"The SSH tests cannot set up their host: {err}", pytrace=False)


def start_sshd_host(*, user: str, subnet: int = 0, name: str | None = None, sftp: bool = True) -> SshdHost:
    """Create the namespace, its link, its login user and its sshd; `subnet` picks 10.231.0.(4*subnet)/30.

    :param sftp: give sshd its SFTP subsystem (a host without one is a case the SSH target handles).
    """
    token = name or secrets.token_hex(3)
    namespace = f"amlrun-{token}"
    link, peer = f"amh{token}"[:15], f"amr{token}"[:15]
    worker_address, address = f"10.231.0.{4 * subnet + 1}", f"10.231.0.{4 * subnet + 2}"
    _remove_stale(worker_address)
    workdir = Path(tempfile.mkdtemp(prefix="amlrun-sshd-"))
    # sshd reads the authorized keys as the login user: that user must be able to reach them.
    workdir.chmod(0o755)
    created_user = _ensure_user(user)
    home = Path(pwd.getpwnam(user).pw_dir)
    host = SshdHost(
        namespace=namespace,
        link=link,
        address=address,
        worker_address=worker_address,
        port=22,
        user=user,
        home=home,
        workdir=workdir,
        key_file=workdir / "client_key",
        known_hosts=workdir / "known_hosts",
        created_user=created_user,
    )
    try:
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", link, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", namespace)
        _run("ip", "addr", "add", f"{worker_address}/30", "dev", link)
        _run("ip", "link", "set", link, "up")
        _in_ns(namespace, "ip", "addr", "add", f"{address}/30", "dev", peer)
        _in_ns(namespace, "ip", "link", "set", peer, "up")
        _in_ns(namespace, "ip", "link", "set", "lo", "up")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "host_key"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host.key_file))
        (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
        (workdir / "authorized_keys").chmod(0o644)
        host_key = (workdir / "host_key.pub").read_text().split()
        host.known_hosts.write_text(f"{address} {host_key[0]} {host_key[1]}\n")
        config = workdir / "sshd_config"
        config.write_text(
            f"""
Port 22
ListenAddress {address}
HostKey {workdir / "host_key"}
PidFile {workdir / "sshd.pid"}
AuthorizedKeysFile {workdir / "authorized_keys"}
AllowUsers {user}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PrintMotd no
{"Subsystem sftp internal-sftp" if sftp else ""}
MaxStartups 100
MaxSessions 100
LogLevel ERROR
"""
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        _in_ns(namespace, SSHD, "-f", str(config), "-E", str(workdir / "sshd.log"))
        _wait_for_port(namespace, address)
    except BaseException:
        host.stop()
        raise
    return host


def _stop_namespace(namespace: str, link: str) -> None:
    """End the namespace's processes (sshd and what it started), by pid, then the namespace and its link."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    subprocess.run(["ip", "link", "del", link], capture_output=True)


def _remove_stale(worker_address: str) -> None:
    """A host an interrupted session left behind on the same subnet would shadow the new one: remove it."""
    links = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout.splitlines()
    for line in links:
        fields = line.split()
        if fields and fields[0].startswith("amh") and f"{worker_address}/30" in fields:
            link = fields[0].split("@")[0]
            _stop_namespace(f"amlrun-{link[3:]}", link)


def _ensure_user(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return False
    except KeyError:
        pass
    # '*' rather than useradd's locked '!': sshd without PAM refuses locked accounts, even for key logins.
    _run("useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", user)
    return True


def _wait_for_port(namespace: str, address: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listening = subprocess.run(
            ["ip", "netns", "exec", namespace, "ss", "-ltn"], capture_output=True, text=True
        ).stdout
        if f"{address}:22" in listening:
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd in namespace {namespace} did not start listening on {address}:22")


def _in_ns(namespace: str, *command: str) -> None:
    _run("ip", "netns", "exec", namespace, *command)


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command)}` failed with exit status {done.returncode}: "
            f"{(done.stderr or done.stdout).strip() or 'no output'}"
        )
