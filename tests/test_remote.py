"""remote.py against a real OpenSSH server on loopback: the "remote" filesystem is this machine's,
so tests check remote effects directly on local paths."""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest

from snakemake_executor_plugin_vastai.remote.ssh import (
    MAX_OUTPUT_BYTES,
    Endpoint,
    HostKeyMismatch,
    RemoteError,
    RemoteHost,
)
from tests.sshd import (
    LocalSshd,
    kill_processes_under,
    process_group,
)


@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[paramiko.PKey, str]:
    path = tmp_path_factory.mktemp("client") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    key = paramiko.Ed25519Key.from_private_key_file(str(path))
    return key, path.with_suffix(".pub").read_text()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, client_key: tuple[paramiko.PKey, str]):
    with LocalSshd(tmp_path_factory.mktemp("sshd")) as server:
        server.authorize(client_key[1])
        yield server


@pytest.fixture
def host(sshd: LocalSshd, client_key: tuple[paramiko.PKey, str]) -> Iterator[RemoteHost]:
    remote = make_host(sshd, client_key[0])
    remote.connect(time.monotonic() + 10)
    yield remote
    remote.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[str]:
    """A job directory; whatever still runs in it afterwards is killed."""
    yield str(tmp_path / "job dir")
    kill_processes_under(tmp_path)


def make_host(sshd: LocalSshd, key: paramiko.PKey, *extra_first: Endpoint) -> RemoteHost:
    return RemoteHost("test-instance", [*extra_first, Endpoint("127.0.0.1", sshd.port)], key)


@contextlib.contextmanager
def refused_endpoint() -> Iterator[Endpoint]:
    """A port that refuses connections: bound, never listening, so no one else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield Endpoint("127.0.0.1", sock.getsockname()[1])


def wait_for_file(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


# -- connecting -------------------------------------------------------------------------------


def test_connect_retries_until_sshd_comes_up(tmp_path, client_key):
    server = LocalSshd(tmp_path / "sshd")
    server.authorize(client_key[1])
    with refused_endpoint() as refused:
        remote = make_host(server, client_key[0], refused)
        later = threading.Timer(1.0, server.start)
        later.start()
        try:
            started = time.monotonic()
            remote.connect(started + 15)
            elapsed = time.monotonic() - started
            assert elapsed >= 1.0, f"connected after {elapsed:.1f} s, before sshd was up"
            assert remote.run("echo up").stdout == "up\n"
        finally:
            later.join()
            remote.close()
            server.stop()


def test_connect_deadline_names_the_last_error(client_key):
    # Like a booting Vast instance: one port refuses, the proxy accepts and hangs up at once.
    with socket.create_server(("127.0.0.1", 0)) as listener, refused_endpoint() as refused:

        def hang_up() -> None:
            while True:
                try:
                    listener.accept()[0].close()
                except OSError:
                    return

        threading.Thread(target=hang_up, daemon=True).start()
        proxy = Endpoint("127.0.0.1", listener.getsockname()[1])
        remote = RemoteHost("booting-instance", [refused, proxy], client_key[0])
        started = time.monotonic()
        with pytest.raises(RemoteError) as caught:
            remote.connect(started + 1.5)
    assert time.monotonic() - started >= 1.5
    message = str(caught.value)
    assert "booting-instance" not in message  # the caller names it: once, not twice
    assert str(refused) in message and str(proxy) in message
    assert f"last error from {proxy}" in message and "banner" in message


def test_host_key_is_pinned_across_reconnects(tmp_path, client_key):
    with LocalSshd(tmp_path / "sshd") as server:
        server.authorize(client_key[1])
        remote = make_host(server, client_key[0])
        remote.connect(time.monotonic() + 10)
        server.restart()  # same key: a reconnect is transparent
        assert remote.run("echo same").stdout == "same\n"
        server.restart(new_host_key=True)
        with pytest.raises(HostKeyMismatch, match=r"host key of root@127\.0\.0\.1:\d+ changed"):
            remote.run("echo other")
        remote.close()


def test_close_is_idempotent_and_final_until_connect(host):
    host.close()
    host.close()
    with pytest.raises(RemoteError, match="closed"):
        host.run("true")
    host.connect(time.monotonic() + 10)
    assert host.run("true").exit_code == 0


# -- short commands ---------------------------------------------------------------------------


def test_run_returns_exit_code_output_and_takes_stdin(host):
    result = host.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert host.run("tr a-z A-Z", stdin=b"shout").stdout == "SHOUT"
    assert host.run("cat").stdout == ""  # stdin is closed, so nothing waits for input
    # Both streams past the SSH window, read together (no deadlock); only their end is kept.
    big = host.run("head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2")
    assert (len(big.stdout), len(big.stderr)) == (MAX_OUTPUT_BYTES, MAX_OUTPUT_BYTES)
    assert host.run("kill -9 $$").exit_code == -1


def test_run_times_out(host, workdir):
    os.makedirs(workdir)
    with pytest.raises(RemoteError, match=r"did not finish within 0.5 s"):
        host.run(f"cd '{workdir}' && sleep 30", timeout=0.5)
    assert host.run("echo still usable").exit_code == 0


def test_run_reconnects_after_the_connection_dropped(host, sshd):
    assert host.run("true").exit_code == 0
    sshd.drop_connections()
    assert host.run("echo back").stdout == "back\n"


def test_threads_share_one_connection_and_reconnect_once(host, sshd, tmp_path):
    def logins() -> int:
        return sshd.log.read_text().count("Accepted publickey")

    def work(n: int) -> None:
        barrier.wait()
        assert host.run(f"echo {n}").stdout == f"{n}\n"
        local = tmp_path / f"file {n}"
        local.write_text(str(n))
        for round_ in range(10):
            host.put_file(local, f"{tmp_path}/remote/{n}/{round_}")
            assert Path(f"{tmp_path}/remote/{n}/{round_}").read_text() == str(n)

    host.run("true")
    before = logins()
    sshd.drop_connections()
    barrier = threading.Barrier(4)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert logins() == before + 1


def test_a_send_that_fails_before_the_reader_sees_the_end_counts_as_a_dead_connection(
    host: RemoteHost,
) -> None:
    """The order that once lost a job: a send fails (paramiko raises EOFError) on a socket
    whose end paramiko's reader thread has not seen yet, so the transport still says it is
    active. Shutting our write side forces that order: the next send fails at once, and the
    server's close only arrives a round trip later. The call must reconnect, not fail."""
    host.run("true")
    transport = host._transport
    assert transport is not None
    for _ in range(20):  # one shutdown is enough; repeated, the order is forced every time
        transport.sock.shutdown(socket.SHUT_WR)

        assert host.run("echo back").stdout == "back\n"

        assert host._transport is not transport  # a new connection did it
        transport = host._transport
        assert transport is not None


# -- streams and process groups -------------------------------------------------------------


def read_all(stream, timeout: float = 10) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while chunk := stream.read(65536, max(0.01, deadline - time.monotonic())):
        data += chunk
    return data


def test_a_stream_takes_stdin_and_gives_output_with_deadlines(host):
    stream = host.open_stream("cat; sleep 0.3; echo done; echo oops >&2", b"request\n", 5)
    echoed = b""
    while len(echoed) < len(b"request\n"):
        echoed += stream.read(100, 5)
    assert echoed == b"request\n"
    with pytest.raises(TimeoutError):  # then nothing for 0.3 s
        stream.read(100, 0.05)
    assert read_all(stream) == b"done\n"
    assert not stream.lost
    assert stream.errors() == "oops"
    stream.close()


def test_a_stream_knows_when_its_connection_died(host, sshd):
    stream = host.open_stream("sleep 30", b"", 5)
    sshd.drop_connections()
    assert read_all(stream) == b""
    assert stream.lost


def start_group(host: RemoteHost, workdir: str, script: str) -> int:
    """A detached process group in workdir, as the job agent starts one; returns its id."""
    where = shlex.quote(workdir)
    result = host.run(
        f"mkdir -p {where} && cd {where} || exit 1; "
        f"setsid sh -c {shlex.quote(script)} > log 2>&1 < /dev/null & echo $!"
    )
    return int(result.stdout)


def test_kill_group_ends_the_whole_process_group(host, workdir):
    pgid = start_group(host, workdir, "sleep 1000 & sleep 1000")
    deadline = time.monotonic() + 5
    while len(process_group(pgid)) < 3:  # the shell, two sleeps
        assert time.monotonic() < deadline
        time.sleep(0.01)
    host.kill_group(workdir, pgid)
    assert process_group(pgid) == []
    assert Path(workdir, "exit_code").read_text() == "143\n"
    host.kill_group(workdir, pgid)  # a finished job is left alone


def test_kill_group_escalates_when_the_job_ignores_term(host, workdir, monkeypatch):
    monkeypatch.setattr("snakemake_executor_plugin_vastai.remote.ssh.KILL_GRACE_S", 0.5)
    pgid = start_group(host, workdir, "trap '' TERM; echo ready; sleep 1000")
    wait_for_file(Path(workdir, "log"))
    started = time.monotonic()
    host.kill_group(workdir, pgid)
    assert time.monotonic() - started >= 0.5
    assert Path(workdir, "exit_code").read_text() == "137\n"
    assert process_group(pgid) == []


# -- files ------------------------------------------------------------------------------------


def test_put_a_file_with_spaces_keeps_content_and_mode(host, tmp_path):
    local = tmp_path / "my file (1).txt"
    local.write_text("hello 'world'\n")
    local.chmod(0o754)
    remote = f"{tmp_path}/remote side/a b/my file (1).txt"
    host.put_file(local, remote)
    assert Path(remote).read_text() == "hello 'world'\n"
    assert stat.S_IMODE(os.stat(remote).st_mode) == 0o754


def test_a_large_upload_is_byte_identical(host, tmp_path):
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(20 * 1024 * 1024))
    host.put_file(local, f"{tmp_path}/remote/big.bin")
    assert Path(tmp_path, "remote", "big.bin").read_bytes() == local.read_bytes()
