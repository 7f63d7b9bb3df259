"""The Docker target's cache on the worker, on the real Docker Engine: the supervisor's folder of each version of
the package, which runs' containers mount, is removed once no run uses it, and never while one does; a process that
holds the lock of those folders fails runs in time, named."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.config import load_settings
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.targets import docker_lib
from airflow_amlrun.targets.docker_transfer import LIB_DIR
from tests.conftest import process_holding_lock, write_script
from tests.integration.docker_engine import SOCKET, SocketProxy, containers_of

pytest_plugins = ["tests.integration.docker_engine"]

# A run of the running version, which waits for the test's word before it imports run_context: from the
# supervisor's folder its container mounts.
WAITS = """
import os, sys, time
print("waiting", flush=True)
for _ in range(1200):
    if os.path.exists("go"):
        break
    time.sleep(0.1)
else:
    sys.exit("never told to go")
from airflow_amlrun.run_context import Run
Run.get_context().log("after_cleanup", 1)
print("went on", flush=True)
"""

QUICK = """
from airflow_amlrun.run_context import Run
Run.get_context().log("acc", 0.9)
"""


# Another process of this machine (stuck, or any user's: every user may open the file) that holds the lock of the
# supervisor's folders exclusively until told to let go.


def an_earlier_version(cache: Path, digest: str, *, days_ago: float = 0) -> Path:
    """The supervisor's folder of another version of the package, made that many days ago."""
    folder = cache / f"lib-{digest}"
    (folder / "pylib").mkdir(parents=True)
    (folder / "supervisor.py").write_text("# an earlier version\n")
    if days_ago:
        made = time.time() - days_ago * 24 * 3600
        os.utime(folder, (made, made))
    return folder


def recorded_daemons(cache: Path) -> list[str]:
    """The daemons recorded as ones whose containers may mount a folder of the cache."""
    return [line for line in (cache / "lib-daemons").read_text().splitlines() if not line.startswith("#")]


def test_a_new_version_removes_the_folders_no_run_uses_and_keeps_the_one_a_running_container_mounts(
    docker_home, tmp_path, monkeypatch
):
    write_script(tmp_path / "old", "train.py", WAITS)
    write_script(tmp_path / "new", "train.py", QUICK)
    cache = Workspace.get().cache_dir / "docker"
    experiment = Experiment(Workspace.get(), "docker-cache")

    # A run of this version starts, and goes on...
    old_run = experiment.submit(ScriptRunConfig(tmp_path / "old", script="train.py", compute_target="docker"))
    # (A version between, whose runs are over.)
    unused = an_earlier_version(cache, "0" * 16)
    lines: list[str] = []
    waiting = threading.Event()

    def follow() -> None:
        def output(line: str) -> None:
            lines.append(line)
            if line == "waiting":
                waiting.set()

        old_run.wait_for_completion(output=output, raise_on_error=False)

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        assert waiting.wait(120), lines
        old_lib = cache / docker_lib.lib_name()

        # ...while the worker is upgraded: a new version of the supervisor's files.
        newer = tmp_path / "newer_supervisor_part.py"
        newer.write_text("# what the next version changed\n")
        sources = docker_lib.lib_sources
        monkeypatch.setattr(docker_lib, "lib_sources", lambda: [*sources(), newer])
        new_lib = cache / docker_lib.lib_name()
        assert new_lib != old_lib

        record = experiment.submit(
            ScriptRunConfig(tmp_path / "new", script="train.py", compute_target="docker")
        ).wait_for_completion(show_output=False)

        assert record.status == "Completed", record.error
        assert record.metrics == {"acc": 0.9}
        assert (new_lib / "supervisor.py").is_file()
        assert not unused.exists()
        assert (old_lib / "pylib" / "airflow_amlrun" / "run_context.py").is_file()  # its container mounts it
    finally:
        # The old run goes on, and imports run_context from its folder.
        (load_settings().local_runs_dir / old_run.id / "run" / "go").write_text("")
        follower.join(120)

    old = Workspace.get().get_run(old_run.id)
    assert old.status == "Completed", (old.error, lines)
    assert old.metrics == {"after_cleanup": 1}
    assert "went on" in lines

    # No run uses the old version's folder any more: the next run removes it.
    again = experiment.submit(
        ScriptRunConfig(tmp_path / "new", script="train.py", compute_target="docker")
    ).wait_for_completion(show_output=False)
    assert again.status == "Completed", again.error
    assert {p.name for p in cache.iterdir()} == {new_lib.name, "lib.lock", "lib-daemons"}
    assert recorded_daemons(cache) == ["unix:///var/run/docker.sock"]


def test_a_run_that_copies_the_folder_into_its_container_uses_it_only_until_it_starts(
    docker_home, tmp_path, monkeypatch
):
    # The archive transfer (a daemon that does not see the worker's files): the folder goes into the container
    # with the code, and no container mounts it.
    monkeypatch.setenv("AMLRUN_DOCKER_TRANSFER", "archive")
    write_script(tmp_path / "src", "train.py", QUICK)
    cache = Workspace.get().cache_dir / "docker"
    experiment = Experiment(Workspace.get(), "docker-cache")
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    first = experiment.submit(config).wait_for_completion(show_output=False)
    old_lib = cache / docker_lib.lib_name()
    assert old_lib.is_dir()

    newer = tmp_path / "newer_supervisor_part.py"
    newer.write_text("# what the next version changed\n")
    sources = docker_lib.lib_sources
    monkeypatch.setattr(docker_lib, "lib_sources", lambda: [*sources(), newer])
    second = experiment.submit(config).wait_for_completion(show_output=False)

    assert (first.status, second.status) == ("Completed", "Completed")
    assert second.metrics == {"acc": 0.9}
    assert {p.name for p in cache.iterdir()} == {docker_lib.lib_name(), "lib.lock", "lib-daemons"}
    assert not Path(old_lib).exists()
    assert recorded_daemons(cache) == []  # no container mounts the folders


def test_a_container_of_a_version_that_recorded_no_daemon_keeps_its_folder_after_the_upgrade(
    docker_home, tmp_path, monkeypatch
):
    # A version before the record of daemons made its folder a month ago, and one of its containers on this
    # machine's daemon mounts it still...
    cache = Workspace.get().cache_dir / "docker"
    before = an_earlier_version(cache, "0" * 16, days_ago=30)
    container = docker_home.create_container(
        load_settings().docker_default_image,
        command=["sleep", "600"],
        host_config=docker_home.create_host_config(
            binds={str(before.resolve()): {"bind": LIB_DIR, "mode": "ro"}}
        ),
    )["Id"]
    docker_home.start(container)
    try:
        # ... when the upgraded worker runs on a daemon it reaches over TCP: no record names the other one.
        write_script(tmp_path / "src", "train.py", QUICK)
        with SocketProxy() as remote:
            monkeypatch.setenv("DOCKER_HOST", remote.url)
            record = (
                Experiment(Workspace.get(), "docker-cache")
                .submit(ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker"))
                .wait_for_completion(show_output=False)
            )

        assert record.status == "Completed", record.error
        assert (before / "supervisor.py").is_file()
        seen = docker_home.exec_start(docker_home.exec_create(container, ["cat", f"{LIB_DIR}/supervisor.py"]))
        assert seen == b"# an earlier version\n"
    finally:
        docker_home.remove_container(container, force=True)


def test_a_process_that_holds_the_lock_of_the_supervisors_folders_fails_the_run_in_time_naming_it(
    docker_home, tmp_path, monkeypatch
):
    monkeypatch.setattr(docker_lib, "LOCK_WAIT_SECONDS", 2.0)
    write_script(tmp_path / "src", "train.py", QUICK)
    cache = Workspace.get().cache_dir / "docker"
    cache.mkdir(parents=True, exist_ok=True)
    lock = cache.resolve() / "lib.lock"
    experiment = Experiment(Workspace.get(), "docker-cache")
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    with process_holding_lock(lock) as holder, pytest.raises(ConfigurationError) as raised:
        experiment.submit(config)

    message = str(raised.value)
    assert f"waited 2 s for the shared lock {lock}" in message
    # The one holding it, named by /proc/locks, is the process to look at.
    assert f"and process {holder.pid} ({sys.executable} -c " in message
    assert "held it exclusively all that time: no container was started" in message
    assert "Wait for it to end, or stop it if it is stuck; then run the task again." in message
    [run] = Workspace.get().list_runs()
    assert run.status == "Failed" and message in run.error
    assert containers_of(docker_home, run.id) == []

    # Once that process has let go, runs go on.
    record = experiment.submit(config).wait_for_completion(show_output=False)
    assert record.status == "Completed", record.error
    assert record.metrics == {"acc": 0.9}


def test_a_daemon_reached_with_tls_is_asked_with_its_tls_files(docker_home, tmp_path, monkeypatch):
    certs = tls_files(tmp_path / "certs")
    write_script(tmp_path / "src", "train.py", QUICK)
    cache = Workspace.get().cache_dir / "docker"
    experiment = Experiment(Workspace.get(), "docker-cache")
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    with TlsDaemon(certs) as daemon:
        # This machine's daemon, reached over TCP with TLS, as the docker CLI would: it sees the worker's files.
        monkeypatch.setenv("DOCKER_HOST", daemon.url)
        monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
        monkeypatch.setenv("DOCKER_CERT_PATH", str(certs))
        monkeypatch.setenv("AMLRUN_DOCKER_TRANSFER", "bind")
        # requests prefers these to the client's own CA file (the Docker SDK's), and would not trust the daemon.
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        first = experiment.submit(config).wait_for_completion(show_output=False)
        assert first.status == "Completed", first.error
        [line] = recorded_daemons(cache)
        assert line.startswith(f"{daemon.url} ") and str(certs / "ca.pem") in line
        old_lib = cache / docker_lib.lib_name()
        unused = an_earlier_version(cache, "0" * 16)

        newer = tmp_path / "newer_supervisor_part.py"
        newer.write_text("# what the next version changed\n")
        sources = docker_lib.lib_sources
        monkeypatch.setattr(docker_lib, "lib_sources", lambda: [*sources(), newer])
        second = experiment.submit(config).wait_for_completion(show_output=False)

    assert second.status == "Completed", second.error
    # The daemon answered: no container of it mounts the folders of the other versions any more.
    assert not unused.exists() and not old_lib.exists()
    assert {p.name for p in cache.iterdir()} == {docker_lib.lib_name(), "lib.lock", "lib-daemons"}


def tls_files(folder: Path) -> Path:
    """A certificate authority, a server certificate for 127.0.0.1 and a client's, as DOCKER_CERT_PATH holds them
    (ca.pem, cert.pem, key.pem; the server's as server.pem, server-key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir()
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, **kind: Any
    ) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if kind.get("ca"):
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        if kind.get("ip"):
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(kind["ip"]))]),
                critical=False,
            )
        if kind.get("usage"):
            builder = builder.add_extension(x509.ExtendedKeyUsage([kind["usage"]]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(
        name: str, cert: Any, key: ec.EllipticCurvePrivateKey | None = None, key_name: str = ""
    ) -> None:
        (folder / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (folder / key_name).write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "amlrun test CA")])
    write("ca.pem", certificate("amlrun test CA", ca_key, ca_name, ca_key, ca=True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = certificate(
        "127.0.0.1", server_key, ca_name, ca_key, ip="127.0.0.1", usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    write("server.pem", server, server_key, "server-key.pem")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = certificate("amlrun worker", client_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    write("cert.pem", client, client_key, "key.pem")
    return folder


class TlsDaemon:
    """This machine's Docker daemon on a TCP port of the loopback that takes TLS with a client certificate, as a
    daemon started with --tlsverify does (socat in front of its socket)."""

    def __init__(self, certs: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.certs = certs
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TlsDaemon:
        if shutil.which("socat") is None:
            pytest.fail(
                "this test needs socat (apt-get install socat): it puts TLS in front of the daemon's socket"
            )
        listen = (
            f"OPENSSL-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,cert={self.certs / 'server.pem'},"
            f"key={self.certs / 'server-key.pem'},cafile={self.certs / 'ca.pem'},verify=1"
        )
        with open(self.certs / "socat.log", "wb") as log:  # its errors, for a look
            self.process = subprocess.Popen(["socat", listen, f"UNIX-CONNECT:{SOCKET}"], stderr=log)
        for _ in range(300):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.__exit__()
        pytest.fail(f"socat did not listen on port {self.port}")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(30)
