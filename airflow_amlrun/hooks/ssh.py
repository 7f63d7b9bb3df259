"""The host of an Airflow `ssh` connection as the SSH target reaches it: one connection, commands and SFTP.

The connection itself is the SSH provider's `SSHHook` (paramiko: credentials, host key checks). `SSHHost`
keeps one client and its SFTP session open, runs commands reading both output streams together, and
reconnects while the connection is lost, for at most the reconnect timeout; its messages say whether the
host was never reached, too slow to answer, or lost. A host whose sshd offers no SFTP subsystem still
works: `sftp()` is then None (the target sends blobs and reads files through its helper on the command
channel instead), and the task log says once how to enable SFTP there.

Connection extras read here besides the SSH provider's own: `conn_timeout` (seconds, default 10),
`amlrun_reconnect_timeout` (seconds, default 300), `amlrun_io_timeout` (seconds of silence after which a
connection counts as dropped, default 20) and `known_hosts` (a known_hosts file holding the host's key, as
the provider's async hook reads it).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import time
import weakref
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any, Literal

from airflow_amlrun.errors import AmlRunError, ConfigurationError, TargetUnreachableError

if TYPE_CHECKING:
    import paramiko
    from airflow.providers.ssh.hooks.ssh import SSHHook

log = logging.getLogger(__name__)

DEFAULT_RECONNECT_TIMEOUT = 300.0
DEFAULT_CONN_TIMEOUT = 10
# A remote step that answers nothing for this long is taken for a dropped connection.
DEFAULT_IO_TIMEOUT = 20.0
# The line of sshd_config that gives a host the SFTP subsystem.
SFTP_SUBSYSTEM = "Subsystem sftp internal-sftp"
# What is known of the run while a remote operation fails, for the message that gives up on it.
RunState = Literal["not started", "unknown", "ended"]


class SSHTargetError(AmlRunError):
    """The SSH target could not do what a run needs on its host (connect, copy, start); the message names the host
    and the fix. Base of the SSH target's errors.
    """

    def __init__(self, message: str, *, host: str) -> None:
        super().__init__(message)
        self.host = host


class SSHTargetConfigurationError(SSHTargetError, ConfigurationError):
    """The connection or the environment does not fit the host (credentials, host key, interpreter); nothing has
    run.

    The message names what to change: the ``ssh`` connection's login or key, the host's entry in known_hosts (or the
    connection's extra ``host_key``), or the environment's interpreter.
    """


class SSHTargetUnreachableError(SSHTargetError, TargetUnreachableError):
    """The host did not answer again within the reconnect timeout; the run may go on there."""


class SSHHost:
    """The host of the Airflow `ssh` connection `name`: commands and SFTP over one connection, reconnecting.

    :param name: the connection id.
    :param host: the host name or address, as the connection gives it.
    :param port: the SSH port.
    :param login: the remote user (None: the SSH provider's default).
    :param extras: the connection's extras (see the module's docstring for those read here).
    """

    def __init__(self, name: str, *, host: str, port: int, login: str | None, extras: dict[str, Any]) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.login = login
        self.extras = extras
        self.reconnect_timeout = float(extras.get("amlrun_reconnect_timeout") or DEFAULT_RECONNECT_TIMEOUT)
        self.conn_timeout = int(extras.get("conn_timeout") or DEFAULT_CONN_TIMEOUT)
        self.io_timeout = float(extras.get("amlrun_io_timeout") or DEFAULT_IO_TIMEOUT)
        self._connection = _Connection()
        # A host dropped without cleanup (a notebook, a failed run kept for inspection) closes its
        # connection when collected; paramiko's own thread would otherwise keep it open for good.
        weakref.finalize(self, self._connection.drop)
        # False once the host turned out to offer no SFTP: transfers then go through the helper.
        self.sftp_offered = True
        # Whether a connection to the host was ever made (a failure is then a lost one, not an unreachable host).
        self.ever_connected = False

    @property
    def where(self) -> str:
        user = f"{self.login}@" if self.login else ""
        return f"{user}{self.host}:{self.port}"

    @cached_property
    def hook(self) -> SSHHook:
        from airflow.providers.ssh.hooks.ssh import SSHHook

        hook = SSHHook(ssh_conn_id=self.name, conn_timeout=self.conn_timeout, conn_retry_attempts=1)
        known_hosts = self.extras.get("known_hosts")
        if known_hosts and hook.host_key is None and not hook.no_host_key_check:
            hook.host_key = _known_host_key(str(known_hosts), self.host, self.port, self.name)
        return hook

    def connect(self) -> paramiko.SSHClient:
        """The open client, connecting (again) when there is none or its transport ended."""
        import paramiko

        if self._connection.client is not None and self.connected():
            return self._connection.client
        self.reset()
        hook = self.hook
        hook.client = None
        try:
            client = hook.get_conn()
        except paramiko.BadHostKeyException as err:
            raise SSHTargetConfigurationError(
                f"The host key of {self.host} (SSH connection {self.name!r}) is not the one on record: "
                f"{err}. If the host was reinstalled, update its entry in known_hosts (or the connection's "
                "extra host_key); otherwise someone may be intercepting the connection.",
                host=self.host,
            ) from err
        except paramiko.AuthenticationException as err:
            raise SSHTargetConfigurationError(
                f"Authentication to {self.where} (SSH connection {self.name!r}) failed: {err}. Check the "
                "connection's login and key_file / private_key / password, and that the public key is in "
                f"~{self.login or ''}/.ssh/authorized_keys on {self.host}.",
                host=self.host,
            ) from err
        except paramiko.SSHException as err:
            if "known_hosts" in str(err) or "not found in" in str(err):
                raise SSHTargetConfigurationError(
                    f"The host key of {self.host}:{self.port} is unknown (SSH connection {self.name!r}), so "
                    "the host cannot be trusted. Add it to ~/.ssh/known_hosts on the worker (ssh-keyscan), "
                    "or to the file the connection's extra known_hosts names, or set its extra host_key.",
                    host=self.host,
                ) from err
            raise SSHTargetError(self._unreachable(err), host=self.host) from err
        except OSError as err:
            error = SSHTargetError(self._unreachable(err), host=self.host)
            raise error from err
        self._connection.client = client
        self.ever_connected = True
        return client

    def _unreachable(self, err: BaseException) -> str:
        return (
            f"Cannot reach SSH host {self.where} (connection {self.name!r}): {_describe(err)}. "
            "Check that the host is up and sshd listens on that port and that the worker can reach it; "
            f"raise the connection's extra conn_timeout (now {self.conn_timeout} s) for a slow network."
        )

    def connected(self) -> bool:
        """Whether the connection stands, as far as its transport knows."""
        client = self._connection.client
        transport = client.get_transport() if client is not None else None
        return bool(transport is not None and transport.is_active())

    def twin(self) -> SSHHost:
        """A second connection to the same host with the same settings, opened on first use; what this one
        learnt of the host (whether it offers SFTP, whether it was ever reached) carries over."""
        twin = SSHHost(self.name, host=self.host, port=self.port, login=self.login, extras=self.extras)
        twin.sftp_offered, twin.ever_connected = self.sftp_offered, self.ever_connected
        return twin

    def reset(self) -> None:
        """Close the connection; the next operation connects again."""
        self._connection.close()

    def sftp(self) -> paramiko.SFTPClient | None:
        """The SFTP session, or None on a host whose sshd offers no SFTP (transfers then use the helper)."""
        import paramiko

        if not self.sftp_offered:
            return None
        if self._connection.sftp is None or not self.connected():
            transport = self.connect().get_transport()
            assert transport is not None
            channel = self._open_session(transport, self.io_timeout)
            try:
                channel.invoke_subsystem("sftp")
                # Silence from here on (the version handshake too) is a TimeoutError, as for a command.
                channel.settimeout(self.io_timeout)
                sftp = paramiko.SFTPClient(channel)
            except paramiko.SSHException as err:
                channel.close()
                if not self.connected():
                    raise
                # The connection is fine, so the server refused the subsystem itself.
                self.sftp_offered = False
                log.warning(
                    "Host %s (SSH connection %r) offers no SFTP subsystem (%s); sending code and reading logs "
                    "through the amlrun helper on the command channel instead, which is slower. To enable "
                    "SFTP, add the line `%s` to the host's /etc/ssh/sshd_config and reload sshd.",
                    self.host,
                    self.name,
                    _describe(err),
                    SFTP_SUBSYSTEM,
                )
                return None
            self._connection.sftp = sftp
        return self._connection.sftp

    @staticmethod
    def _open_session(transport: paramiko.Transport, timeout: float) -> paramiko.Channel:
        """A new channel on the connection; TimeoutError when the host does not answer within timeout."""
        import paramiko

        try:
            return transport.open_session(timeout=timeout)
        except paramiko.SSHException as err:
            # paramiko says so only in words; a link gone silent must count as such, not as a refusal.
            if transport.is_active() and "Timeout" in str(err):
                raise TimeoutError(f"no answer to opening an SSH channel for {timeout:g} s") from err
            raise

    def exec(
        self, command: str, stdin: bytes | None, timeout: float, sink: IO[bytes] | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run a command on the host: its exit status, stdout (unless sent to sink) and stderr.

        Both streams are read as they come: they share the channel's flow-control window, so one left
        unread (megabytes of warnings on stderr) would stall the other. Silence on both for `timeout`
        seconds raises TimeoutError.
        """
        transport = self.connect().get_transport()
        assert transport is not None
        channel = self._open_session(transport, timeout)
        try:
            channel.settimeout(timeout)
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            # A selector (epoll), not select(): a process with over 1,024 descriptors open (a triggerer
            # following many runs) gets channel descriptors that select() cannot wait on.
            with selectors.DefaultSelector() as ready:
                ready.register(channel, selectors.EVENT_READ)
                while True:
                    if channel.recv_stderr_ready():
                        err += channel.recv_stderr(1 << 16)
                    elif channel.recv_ready():
                        data = channel.recv(1 << 16)
                        if sink is not None:
                            sink.write(data)
                        else:
                            out += data
                    elif channel.eof_received or channel.closed:
                        break
                    elif not ready.select(timeout):
                        raise TimeoutError(f"no answer to {command.split()[0]} ... for {timeout:g} s")
            if not channel.status_event.wait(timeout):
                raise TimeoutError(f"no exit status from {command.split()[0]} ... within {timeout:g} s")
            if channel.exit_status < 0 and not transport.is_active():
                raise EOFError("the connection closed before the command's exit status arrived")
            return channel.exit_status, bytes(out), bytes(err)
        finally:
            channel.close()

    def retrying(self, action: str, operation: Any, *, run: RunState = "unknown") -> Any:
        """Do a remote operation, reconnecting while the connection is lost, for at most the reconnect timeout.

        The run goes on on the host meanwhile; every read is by offset, so nothing is lost or repeated.
        `run` says what is known of the run, for the message that gives up.
        """
        import paramiko

        deadline = time.monotonic() + self.reconnect_timeout
        attempt = 0
        while True:
            try:
                result = operation()
                if attempt:
                    log.warning("Reconnected to %s; %s again.", self.where, action)
                return result
            except (
                SSHTargetConfigurationError,
                paramiko.BadHostKeyException,
                paramiko.AuthenticationException,
            ):
                raise
            except (SSHTargetError, paramiko.SSHException, OSError, EOFError) as err:
                connected = self.connected()
                # Silence while the connection stands: a dead link the transport has not noticed yet, or a
                # host too slow to answer within amlrun_io_timeout.
                silent = isinstance(err, TimeoutError) and connected
                if isinstance(err, SSHTargetError) and connected:
                    raise
                if not (silent or isinstance(err, EOFError) or not connected):
                    raise
                self.reset()
                if time.monotonic() > deadline:
                    raise SSHTargetUnreachableError(
                        self._gave_up(action, err, silent, run), host=self.host
                    ) from err
                if attempt == 0:
                    if silent:
                        log.warning(
                            "No answer from %s for %g s while %s (%s); reconnecting.%s",
                            self.where,
                            self.io_timeout,
                            action,
                            _describe(err),
                            " The run goes on on the host." if run == "unknown" else "",
                        )
                    elif self.ever_connected:
                        log.warning(
                            "Lost the SSH connection to %s while %s (%s); reconnecting.%s",
                            self.where,
                            action,
                            _describe(err),
                            " The run goes on on the host." if run == "unknown" else "",
                        )
                    else:
                        log.warning("%s Trying again while %s.", _describe(err, bare=True), action)
                attempt += 1
                time.sleep(min(0.5 * attempt, 3.0))

    def _gave_up(self, action: str, err: BaseException, silent: bool, run: RunState) -> str:
        """Why a remote operation was given up after the reconnect timeout, and what to do."""
        wait = f"{self.reconnect_timeout:.0f} s"
        if not self.ever_connected:
            message = (
                f"{_describe(err, bare=True)} Tried for {wait} while {action}; raise the connection's extra "
                "amlrun_reconnect_timeout to wait longer."
            )
        elif silent:
            message = (
                f"Host {self.where} did not answer while {action}: nothing came for {self.io_timeout:g} s, again "
                f"for {wait}, although the SSH connection itself was up ({_describe(err)}). A slow or busy host "
                f"needs a longer wait: raise the connection's extra amlrun_io_timeout (now {self.io_timeout:g} s)."
            )
        else:
            message = (
                f"Lost the connection to {self.where} while {action} and could not reconnect within {wait} "
                f"({_describe(err)}). Raise the connection's extra amlrun_reconnect_timeout to wait longer."
            )
        if run == "unknown":
            message += (
                " The run itself may still be going on the host: a retry of the task re-attaches to it."
            )
        elif run == "ended":
            message += (
                " The run itself has ended on the host: a retry of the task (or `amlrun reconcile`) records "
                "its outcome and collects its outputs."
            )
        return message


class _Connection:
    """The open SSH client and its SFTP session, closed together."""

    def __init__(self) -> None:
        self.client: paramiko.SSHClient | None = None
        self.sftp: paramiko.SFTPClient | None = None

    def close(self) -> None:
        for closable in (self.sftp, self.client):
            if closable is not None:
                with contextlib.suppress(Exception):
                    closable.close()
        self.sftp = None
        self.client = None

    def drop(self) -> None:
        """Close the transport (and so the SFTP session on it) quietly, as a finalizer may run late."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        self.sftp = None
        self.client = None


def _describe(err: BaseException, bare: bool = False) -> str:
    """An error as the user reads it: its type named when its message is empty (a socket timeout says
    nothing), its cause's when it only wraps one; `bare` keeps the message of our own error as it is."""
    if isinstance(err, SSHTargetError):
        if bare:
            return str(err)
        if err.__cause__ is not None:
            return _describe(err.__cause__)
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _known_host_key(path: str, host: str, port: int, conn_id: str) -> paramiko.PKey | None:
    import os

    import paramiko

    keys = paramiko.HostKeys()
    try:
        keys.load(os.path.expanduser(path))
    except OSError as err:
        raise SSHTargetConfigurationError(
            f"SSH connection {conn_id!r}: cannot read its known_hosts file {path!r} ({err}); fix the extra "
            "known_hosts or remove it to use ~/.ssh/known_hosts.",
            host=host,
        ) from err
    found = keys.lookup(host if port == 22 else f"[{host}]:{port}")
    # None leaves the host unknown: the connection is then refused once the host answers.
    return next(iter(found.values())) if found else None
