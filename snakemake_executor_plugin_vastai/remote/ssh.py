"""SSH to one rented instance: a persistent paramiko connection, commands, streams, uploads.

Only this module knows SSH. An instance is reached as root over one long-lived transport that
every command, upload and job stream shares, so a job costs channels, never handshakes. What a
job sends back (its log, exit code and files) comes through ``ExecStream``; the job itself runs
detached on the instance and outlives a dropped connection (see ``onhost/agent.py``).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import select
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paramiko

from snakemake_executor_plugin_vastai.base.errors import HostError, PluginBug
from snakemake_executor_plugin_vastai.base.logger import get_logger

log = get_logger(__name__)


class _AsDebug(logging.Filter):
    """paramiko logs every failed attempt with a traceback at ERROR, and connecting to a booting
    instance fails many times; we retry and report failures ourselves, so its messages are kept
    for debugging but demoted to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


PARAMIKO_LOG = f"{__name__}.paramiko"
logging.getLogger(PARAMIKO_LOG).addFilter(_AsDebug())

T = TypeVar("T")

KEEPALIVE_S = 15
# Socket, banner, handshake and auth timeout for one connection attempt.
ATTEMPT_TIMEOUT_S = 10.0
# A dead peer that stops acknowledging (with keepalives flowing every KEEPALIVE_S) kills the
# socket after this long, so a silently dropped connection is noticed and reconnected.
TCP_USER_TIMEOUT_MS = 60_000
# The window we grant the server; paramiko's 2 MiB default caps downloads on long links.
WINDOW_SIZE = 16 * 1024 * 1024
# paramiko starts a rekey of its own after 512 MiB either way, and a channel that reads while
# it runs can deadlock until "Key-exchange timed out" (paramiko issue 822; seen here on a 1 GiB
# job log). So we never start one: the server rekeys at its cipher's limit (OpenSSH always
# does), and paramiko answers that without the race.
NO_CLIENT_REKEY = 2**62
READ_CHUNK = 1024 * 1024
# Of a command's stdout and of its stderr, only the last this many bytes are kept (a host may
# send without end; what a caller reads, an error or a marker line, is at the end).
MAX_OUTPUT_BYTES = 1024 * 1024
KILL_GRACE_S = 5
EXIT_CODE_FILE = "exit_code"  # in a job's workdir; written by the job or by the kill script

_NETWORK_ERRORS = (OSError, EOFError, paramiko.SSHException, paramiko.SFTPError)
# A send can fail on a socket whose end paramiko's reader thread has not seen yet (the
# transport still says it is active); these are the errors of such a send, and the reader
# gets this long to notice before the connection is taken for alive.
_SEND_FAILURES = (EOFError, ConnectionError)
END_NOTICE_SECONDS = 2.0

# TERM the job's process group, KILL it after a grace period, and record an exit code if the
# job died before writing its own. Zombies do not count as alive: a container's PID 1 may reap
# orphans late or never. (Reads /proc because minimal images have no ps or pgrep.)
_KILL_SCRIPT = """\
cd {workdir} || exit 1
[ -e {exit_file} ] && exit 0
alive() {{
  for f in /proc/[0-9]*/stat; do
    read -r s 2>/dev/null < "$f" || continue
    set -- ${{s##*") "}}
    [ "$3" = {pgid} ] && [ "$1" != Z ] && return 0
  done
  return 1
}}
kill -TERM -{pgid} 2>/dev/null
code=143 i=0
while alive; do
  if [ $i -ge {grace_ticks} ]; then kill -KILL -{pgid} 2>/dev/null; code=137; break; fi
  sleep 0.1
  i=$((i + 1))
done
# The job's agent may have reported the end and removed the directory meanwhile: fine.
[ -e {exit_file} ] || {{ echo $code > {exit_file}.tmp && mv -f {exit_file}.tmp {exit_file}; }} \
  2>/dev/null || true
"""


def load_private_key(pem: str) -> paramiko.PKey:
    """The run's ed25519 key (OpenSSH PEM) as paramiko wants it; only this module knows SSH."""
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem))


@dataclass(frozen=True)
class Endpoint:
    """One way to reach an instance's sshd (the direct port or the Vast SSH proxy)."""

    host: str
    port: int
    user: str = "root"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class CountingSocket:
    """A connected socket that counts the bytes it carries each way: what Vast.ai bills as
    the instance's bandwidth (SSH's own bytes included, as the host's network sees them)."""

    def __init__(self, sock: socket.socket, traffic: Traffic) -> None:
        self._sock = sock
        self._traffic = traffic

    def send(self, data: bytes) -> int:
        sent = self._sock.send(data)
        self._traffic.add(sent=sent)
        return sent

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)
        self._traffic.add(sent=len(data))

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        self._traffic.add(received=len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@dataclass
class Traffic:
    """Bytes sent to and received from one host, over all its connections."""

    sent: int = 0
    received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.sent += sent
            self.received += received


class RemoteError(HostError):
    """An SSH-level failure; the message names what failed, and the instance unless the
    caller names it (a failed first login: the instance wraps it)."""


class HostKeyMismatch(RemoteError):
    """The instance presented a different host key than the one pinned on first contact."""


@dataclass(frozen=True)
class CommandResult:
    """Outcome of a short command; exit_code is -1 when the command died from a signal (the
    server then reports no exit status)."""

    exit_code: int
    stdout: str
    stderr: str


class RemoteHost:
    """One persistent SSH connection to one instance, shared by all threads.

    Opening channels on a paramiko Transport is thread-safe; reconnecting and the single SFTP
    session (which is not) are serialised with locks.
    """

    def __init__(
        self,
        name: str,
        endpoints: list[Endpoint],
        key: paramiko.PKey,
        reconnect_timeout: float = 60.0,
    ) -> None:
        """``endpoints`` in order of preference; ``reconnect_timeout`` bounds the transparent
        reconnects after a dropped connection (the first connect has its own deadline)."""
        if not endpoints:
            raise PluginBug(f"{name}: no SSH endpoints")  # only a booted instance connects
        self.name = name
        self.endpoints = list(endpoints)
        self.reconnect_timeout = reconnect_timeout
        self._key = key
        self._host_key: paramiko.PKey | None = None
        self._transport: paramiko.Transport | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lock = threading.Lock()
        self.traffic = Traffic()

    def __repr__(self) -> str:
        return f"RemoteHost({self.name!r}, {', '.join(map(str, self.endpoints))})"

    # -- connection -------------------------------------------------------------------------

    def connect(self, deadline: float) -> None:
        """Connect, retrying until ``time.monotonic()`` reaches deadline.

        Vast's sshd often refuses or resets connections for a while after the instance reports
        running, and keys attached at boot take a moment to be in force, so every failure except
        a changed host key is retried, cycling through the endpoints with backoff.
        """
        with self._lock:
            self._closed = False
            if self._transport is None or not self._transport.is_active():
                log.debug("%s: connecting via %s", self.name, ", ".join(map(str, self.endpoints)))
                self._connect_locked(deadline)

    def close(self) -> None:
        """Close the connection; later calls fail until connect() is called again. Idempotent."""
        with self._lock:
            self._closed = True
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    def _connect_locked(self, deadline: float) -> None:
        if self._transport is not None:
            self._transport.close()  # a dead transport still holds its socket
            self._transport = None
        delay, last = 0.5, ""
        while True:
            for endpoint in self.endpoints:
                timeout = min(ATTEMPT_TIMEOUT_S, max(1.0, deadline - time.monotonic()))
                try:
                    self._transport = self._open(endpoint, timeout)
                    log.debug("%s: connected via %s", self.name, endpoint)
                    return
                except HostKeyMismatch:
                    raise
                except _NETWORK_ERRORS as exc:
                    last = f"{endpoint}: {_describe(exc)}"
                    log.debug("%s: connect failed: %s", self.name, last)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteError(
                    f"could not connect via {', '.join(map(str, self.endpoints))} in time; "
                    f"last error from {last}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)

    def _open(self, endpoint: Endpoint, timeout: float) -> paramiko.Transport:
        """One connection attempt: TCP, handshake, host key check, public key auth with our key
        only (a Transport never consults known_hosts, an agent or ~/.ssh)."""
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
        transport = paramiko.Transport(
            CountingSocket(sock, self.traffic), default_window_size=WINDOW_SIZE
        )
        transport.set_log_channel(PARAMIKO_LOG)
        transport.packetizer.REKEY_BYTES = transport.packetizer.REKEY_PACKETS = NO_CLIENT_REKEY
        try:
            transport.banner_timeout = transport.handshake_timeout = timeout
            transport.auth_timeout = timeout
            transport.start_client(timeout=timeout)
            self._check_host_key(endpoint, transport.get_remote_server_key())
            transport.auth_publickey(endpoint.user, self._key)
            if not transport.is_authenticated():
                raise paramiko.AuthenticationException("server wants more than a public key")
            transport.set_keepalive(KEEPALIVE_S)
        except BaseException:
            transport.close()
            raise
        return transport

    def _check_host_key(self, endpoint: Endpoint, key: paramiko.PKey) -> None:
        """Trust the first host key this object sees and refuse any other afterwards: a new key
        on a reconnect means a different machine (or someone in between), not our instance."""
        if self._host_key is None:
            self._host_key = key
        elif key.asbytes() != self._host_key.asbytes():
            raise HostKeyMismatch(
                f"{self.name}: host key of {endpoint} changed from {self._host_key.fingerprint} "
                f"to {key.fingerprint}; refusing to connect"
            )

    def _live_transport(self, reconnect_timeout: float | None = None) -> paramiko.Transport:
        """The open transport, reconnecting within ``reconnect_timeout`` (default: the host's)."""
        budget = self.reconnect_timeout if reconnect_timeout is None else reconnect_timeout
        with self._lock:
            if self._closed:
                raise RemoteError(f"{self.name}: connection was closed")
            if self._transport is None or not self._transport.is_active():
                log.debug("%s: SSH connection lost; reconnecting", self.name)
                self._connect_locked(time.monotonic() + budget)
            assert self._transport is not None
            return self._transport

    def _call(
        self,
        what: str,
        action: Callable[[paramiko.Transport], T],
        retry: bool = True,
        reconnect_timeout: float | None = None,
    ) -> T:
        """Run action on a live transport. A dead connection is often only discovered when used,
        so if the transport died, reconnect and run the action once more."""
        transport = self._live_transport(reconnect_timeout)
        try:
            return action(transport)
        except _NETWORK_ERRORS as exc:
            if retry and _is_dead(transport, isinstance(exc, _SEND_FAILURES)):
                return self._call(what, action, False, reconnect_timeout)
            raise RemoteError(f"{self.name}: {what} failed: {_describe(exc)}") from exc

    def _sftp_call(self, what: str, action: Callable[[paramiko.SFTPClient], T]) -> T:
        """Like _call, on the host's one SFTP session (re-opened after a reconnect). paramiko's
        SFTPClient must not be used by two threads at once, hence the lock."""

        def with_sftp(transport: paramiko.Transport) -> T:
            sftp = self._sftp
            channel = sftp.get_channel() if sftp else None
            if channel is None or channel.closed or channel.get_transport() is not transport:
                sftp = self._sftp = paramiko.SFTPClient.from_transport(transport)
            assert sftp is not None
            return action(sftp)

        with self._sftp_lock:
            return self._call(what, with_sftp)

    # -- commands -------------------------------------------------------------------------

    def run(self, command: str, timeout: float = 120, stdin: bytes | None = None) -> CommandResult:
        """Run a short command and collect its output. A connection found dead before the command
        starts is re-established once; one lost while it runs is an error (it may have run)."""
        deadline = time.monotonic() + timeout
        channel = self._call(f"starting {command!r}", lambda t: _exec(t, command))
        with channel:
            try:
                if stdin:
                    channel.sendall(stdin)
                channel.shutdown_write()
                stdout, stderr = _drain(channel, deadline)
                if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError
            except TimeoutError as exc:
                raise RemoteError(
                    f"{self.name}: {command!r} did not finish within {timeout:g} s"
                ) from exc
            except _NETWORK_ERRORS as exc:
                raise RemoteError(f"{self.name}: {command!r} failed: {_describe(exc)}") from exc
            exit_code = channel.recv_exit_status()
            if exit_code == -1 and not channel.get_transport().is_active():
                raise RemoteError(f"{self.name}: connection lost while running {command!r}")
        return CommandResult(
            exit_code, stdout.decode(errors="replace"), stderr.decode(errors="replace")
        )

    def open_stream(self, command: str, stdin: bytes, reconnect_timeout: float) -> ExecStream:
        """Start a command, hand it ``stdin`` (then EOF) and return its output as a stream.
        ``reconnect_timeout`` bounds a reconnect first needed, so a caller that watches a job
        keeps control while the host is unreachable."""
        channel = self._call(
            f"starting {command!r}",
            lambda t: _exec(t, command),
            reconnect_timeout=reconnect_timeout,
        )
        try:
            channel.sendall(stdin)
            channel.shutdown_write()
        except _NETWORK_ERRORS as exc:
            channel.close()
            raise RemoteError(
                f"{self.name}: sending to {command!r} failed: {_describe(exc)}"
            ) from exc
        return ExecStream(self.name, channel)

    def kill_group(self, workdir: str, pgid: int) -> None:
        """End a job's whole process group: TERM, then KILL after a grace period. Records an
        exit code (143 or 137) in its workdir when the job died before writing its own."""
        script = _KILL_SCRIPT.format(
            workdir=shlex.quote(workdir),
            pgid=pgid,
            exit_file=EXIT_CODE_FILE,
            grace_ticks=round(KILL_GRACE_S * 10),
        )
        result = self.run(script, timeout=KILL_GRACE_S + 60)
        if result.exit_code != 0:
            raise RemoteError(
                f"{self.name}: could not kill process group {pgid}: {result.stderr.strip()}"
            )

    # -- files --------------------------------------------------------------------------------

    def put_file(self, local: Path, remote: str) -> None:
        """Upload one file, creating missing parent directories and keeping its mode."""
        self._sftp_call(f"uploading {local} to {remote}", lambda s: self._put(s, local, remote))

    def _put(self, sftp: paramiko.SFTPClient, local: Path, remote: str) -> None:
        with open(local, "rb") as f:
            try:
                sftp.putfo(f, remote)
            except FileNotFoundError:  # the remote parent is missing; rarely, so create lazily
                _mkdirs(sftp, posixpath.dirname(remote))
                f.seek(0)
                sftp.putfo(f, remote)
            sftp.chmod(remote, stat.S_IMODE(os.fstat(f.fileno()).st_mode))


class ExecStream:
    """The stdout of a running command as a byte stream, read with deadlines."""

    def __init__(self, host_name: str, channel: paramiko.Channel) -> None:
        self.host_name = host_name
        self._channel = channel

    def read(self, size: int, timeout: float) -> bytes:
        """Up to size bytes; b"" once the command's output ended (or the connection died:
        ``lost`` tells which). Raises TimeoutError when nothing came within timeout."""
        self._channel.settimeout(timeout)
        try:
            return self._channel.recv(size)
        except TimeoutError:
            raise
        except _NETWORK_ERRORS as exc:
            raise RemoteError(f"{self.host_name}: reading failed: {_describe(exc)}") from exc

    @property
    def lost(self) -> bool:
        """Whether the connection under this stream is gone."""
        transport = self._channel.get_transport()
        return transport is None or not transport.is_active()

    def errors(self) -> str:
        """What the command wrote to stderr so far (a traceback, a shell's complaint): its
        end, read until nothing more is waiting or MAX_OUTPUT_BYTES came."""
        kept, read = bytearray(), 0
        while read < MAX_OUTPUT_BYTES and self._channel.recv_stderr_ready():
            chunk = self._channel.recv_stderr(READ_CHUNK)
            _keep_end(kept, chunk)
            read += len(chunk)
        return kept.decode(errors="replace").strip()

    def close(self) -> None:
        self._channel.close()


def _is_dead(transport: paramiko.Transport, after_a_failed_send: bool) -> bool:
    """Whether the connection is gone; after a failed send, once the reader has had
    END_NOTICE_SECONDS to see the end the send met."""
    deadline = time.monotonic() + (END_NOTICE_SECONDS if after_a_failed_send else 0.0)
    while transport.is_active():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _exec(transport: paramiko.Transport, command: str) -> paramiko.Channel:
    channel = transport.open_session(timeout=ATTEMPT_TIMEOUT_S)
    try:
        channel.exec_command(command)
    except BaseException:
        channel.close()
        raise
    return channel


def _drain(channel: paramiko.Channel, deadline: float) -> tuple[bytes, bytes]:
    """Read stdout and stderr together until EOF; reading one to its end first could deadlock
    once the other fills its window. Only the end of each is kept (MAX_OUTPUT_BYTES)."""
    stdout, stderr = bytearray(), bytearray()
    while True:
        # All data precedes the EOF, so once EOF was seen, one more pass empties the buffers.
        done = channel.eof_received or channel.closed
        while channel.recv_ready():
            _keep_end(stdout, channel.recv(READ_CHUNK))
        while channel.recv_stderr_ready():
            _keep_end(stderr, channel.recv_stderr(READ_CHUNK))
        if done:
            return bytes(stdout), bytes(stderr)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        select.select([channel], [], [], remaining)


def _keep_end(kept: bytearray, chunk: bytes) -> None:
    """Append chunk, then drop all but the last MAX_OUTPUT_BYTES."""
    kept += chunk
    del kept[:-MAX_OUTPUT_BYTES]


def _mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """mkdir -p over SFTP; tolerates another client creating the same directory meanwhile."""
    if path in ("", "/", "."):
        return
    try:
        if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            return
        raise NotADirectoryError(f"{path} exists and is not a directory")
    except FileNotFoundError:
        pass
    _mkdirs(sftp, posixpath.dirname(path.rstrip("/")))
    try:
        sftp.mkdir(path)
    except OSError:
        if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            raise


def error_detail(error: BaseException, host_name: str) -> str:
    """An error's text without a leading "<host name>: ", for a message that names the host
    itself (each message names its instance once)."""
    return str(error).removeprefix(f"{host_name}: ")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
