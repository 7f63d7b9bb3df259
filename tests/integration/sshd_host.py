"""A "remote VM" for tests and benchmarks: sshd in a network namespace of its own, reached over a veth pair.

The namespace has its own address (10.231.x.2/30, the worker side is 10.231.x.1), its own host key and a
login user of its own (shell /bin/sh, so no rc file slows every command down), and its link can be cut
and restored like a real network's. Needs root (ip netns, useradd, sshd): `host_for_tests` fails the test
run, saying what is missing, rather than letting the SSH tests pass unseen as skipped.

Several test sessions (or a benchmark) may run on one machine at once: each host is registered under
``REGISTRY`` with the process that owns it, a host takes the first subnet from the one asked for that no live
owner's host holds, and only hosts whose owner is gone are removed as stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
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
# The hosts running on this machine, a JSON file each, and the lock under which one is chosen a subnet.
REGISTRY = Path("/run/amlrun-sshd-hosts")
# 10.231.0.(4*subnet)/30 for subnet 0 to 63.
SUBNETS = 64
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
    # Held (an exclusive flock on the host's lock file) for as long as the host lives: the kernel lets go of it
    # when this process ends, however it ends, which tells another session that the host is stale.
    owner_lock: int | None = None

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
            _delete_user(self.user)
        shutil.rmtree(self.workdir, ignore_errors=True)
        # Last: a session killed before this line leaves the entry, and the next session removes what is left.
        (REGISTRY / f"{self.namespace}.json").unlink(missing_ok=True)
        (REGISTRY / f"{self.namespace}.lock").unlink(missing_ok=True)
        if self.owner_lock is not None:
            os.close(self.owner_lock)
            self.owner_lock = None


def _delete_user(user: str) -> None:
    """Kill every process of `user`, then delete it and its home."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if proc.name.isdigit() and proc.stat().st_uid == uid:
                os.kill(int(proc.name), signal.SIGKILL)
    subprocess.run(["userdel", "-r", user], capture_output=True)


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
    """Create the namespace, its link, its login user and its sshd, on 10.231.0.(4*n)/30 for the first subnet n
    from `subnet` on that no other live host holds.

    :param user: the login user; give each test session its own (a host that created its user deletes it).
    :param name: a word in the host's names, for whoever reads `ip link`.
    :param sftp: give sshd its SFTP subsystem (a host without one is a case the SSH target handles).
    """
    # Link names are 15 characters at most; the random part keeps two sessions' hosts of one name apart.
    token = ((name or "") + secrets.token_hex(3))[-12:]
    namespace = f"amlrun-{os.getpid()}-{token}"
    link, peer = f"amh{token}", f"amr{token}"
    # The whole setup holds the registry's lock: no other session chooses a subnet, or reads an entry, meanwhile.
    with _registry_lock():
        subnet = _free_subnet(subnet)
        worker_address, address = f"10.231.0.{4 * subnet + 1}", f"10.231.0.{4 * subnet + 2}"
        _remove_unregistered(worker_address)
        workdir = Path(tempfile.mkdtemp(prefix="amlrun-sshd-"))
        created_user = not _user_exists(user)
        owner_lock = _hold(REGISTRY / f"{namespace}.lock")
        # Registered with all it is about to make before making any of it: a session that dies from here on
        # leaves an entry by which the next one removes what was made.
        _register(namespace, link=link, subnet=subnet, user=user, created_user=created_user, workdir=workdir)
        host = SshdHost(
            namespace=namespace,
            link=link,
            address=address,
            worker_address=worker_address,
            port=22,
            user=user,
            home=Path("/nonexistent"),
            workdir=workdir,
            key_file=workdir / "client_key",
            known_hosts=workdir / "known_hosts",
            created_user=created_user,
            owner_lock=owner_lock,
        )
        try:
            _setup(host, peer, sftp)
        except BaseException:
            host.stop()
            raise
    return host


def _setup(host: SshdHost, peer: str, sftp: bool) -> None:
    namespace, link, workdir, user = host.namespace, host.link, host.workdir, host.user
    address, worker_address = host.address, host.worker_address
    _run("ip", "netns", "add", namespace)
    _run("ip", "link", "add", link, "type", "veth", "peer", "name", peer)
    _run("ip", "link", "set", peer, "netns", namespace)
    _run("ip", "addr", "add", f"{worker_address}/30", "dev", link)
    # sshd reads the authorized keys as the login user: that user must be able to reach them.
    workdir.chmod(0o755)
    if host.created_user:
        # '*' rather than useradd's locked '!': sshd without PAM refuses locked accounts, even for key logins.
        _run("useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", user)
    host.home = Path(pwd.getpwnam(user).pw_dir)
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


def _stop_namespace(namespace: str, link: str) -> None:
    """End the namespace's processes (sshd and what it started), by pid, then the namespace and its link."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    subprocess.run(["ip", "link", "del", link], capture_output=True)


@contextlib.contextmanager
def _registry_lock() -> Any:
    REGISTRY.mkdir(exist_ok=True)
    with open(REGISTRY / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _register(namespace: str, **fields: Any) -> None:
    """Write the host's entry whole (a new file renamed into place)."""
    entry = {"namespace": namespace, **{k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}}
    path = REGISTRY / f"{namespace}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(entry))
    os.replace(partial, path)


def _hold(lock_file: Path) -> int:
    """Open and lock `lock_file` for this process's lifetime (not inherited by the processes it starts)."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _owner_gone(lock_file: Path) -> bool:
    """Whether nobody holds the host's lock: its owner ended (or never got as far as taking it)."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _free_subnet(preferred: int) -> int:
    """The first subnet from `preferred` on (then from 0) that no live owner's host holds; the hosts of owners
    that are gone (a session killed before it stopped its hosts) are removed on the way."""
    held = set()
    for path in REGISTRY.glob("*.json"):
        lock_file = path.with_suffix(".lock")
        if not _owner_gone(lock_file):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                held.add(int(json.loads(path.read_text())["subnet"]))
            continue
        with contextlib.suppress(OSError, ValueError, TypeError):
            _remove_stale(json.loads(path.read_text()))
        path.unlink(missing_ok=True)
        lock_file.unlink(missing_ok=True)
    for subnet in [*range(preferred, SUBNETS), *range(preferred)]:
        if subnet not in held:
            return subnet
    raise RuntimeError(f"All {SUBNETS} SSH test host subnets are held by live test sessions (see {REGISTRY})")


def _remove_stale(entry: dict[str, Any]) -> None:
    """Remove the host of an owner that is gone: its namespace and link, the user it created, its files. Only
    what a host of these tests can have made: a login user named amlrun-..., a folder amlrun-sshd-* in the
    temporary folder."""
    namespace, link = str(entry.get("namespace", "")), str(entry.get("link", ""))
    if re.fullmatch(r"amlrun-[\w-]+", namespace) and re.fullmatch(r"amh\w+", link):
        _stop_namespace(namespace, link)
    user = str(entry.get("user", ""))
    if entry.get("created_user") is True and user.startswith("amlrun-"):
        _delete_user(user)
    workdir = Path(str(entry.get("workdir", "")))
    if workdir.parent == Path(tempfile.gettempdir()) and workdir.name.startswith("amlrun-sshd-"):
        shutil.rmtree(workdir, ignore_errors=True)


def _remove_unregistered(worker_address: str) -> None:
    """A host on the same subnet that no entry names (left by a session from before the registry, or by one
    whose entry was lost) would shadow the new one: remove it. Called under the lock, after _free_subnet: no
    live host holds this subnet."""
    registered = set()
    for path in REGISTRY.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            registered.add(json.loads(path.read_text())["link"])
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout.splitlines()
    for line in links:
        fields = line.split()
        if fields and fields[0].startswith("amh") and f"{worker_address}/30" in fields:
            link = fields[0].split("@")[0]
            if link in registered:
                continue
            token = link[3:]
            # amlrun-<token> (before the registry) or amlrun-<pid>-<token>.
            found = [n for n in namespaces if re.fullmatch(rf"amlrun-(\d+-)?{re.escape(token)}", n)]
            _stop_namespace(found[0] if found else f"amlrun-{token}", link)


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
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
