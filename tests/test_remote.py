"""remote.py against a real OpenSSH server on loopback: the "remote" filesystem is this machine's,
so tests check remote effects directly on local paths."""

from __future__ import annotations

import contextlib
import os
import shutil
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

from snakemake_executor_plugin_vastai.remote import (
    DetachedJob,
    Endpoint,
    HostKeyMismatch,
    RemoteError,
    RemoteHost,
)
from tests.sshd import (
    LocalSshd,
    kill_processes_under,
    process_group,
    processes_under,
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


def wait_for_exit(job: DetachedJob, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (code := job.poll()) is None:
        assert time.monotonic() < deadline, f"{job} did not finish"
        time.sleep(0.01)
    return code


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
    assert "booting-instance" in message
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
    big = host.run("head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2")
    assert (len(big.stdout), len(big.stderr)) == (3_000_000, 3_000_000)
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
            assert host.read_from(f"{tmp_path}/remote/{n}/{round_}", 0) == str(n).encode()

    host.run("true")
    before = logins()
    sshd.drop_connections()
    barrier = threading.Barrier(4)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert logins() == before + 1


# -- detached jobs ----------------------------------------------------------------------------


def test_detached_job_gets_secrets_only_through_a_private_file(host, workdir):
    secret = "p@ss word 'single' \"double\" $HOME `id` \\ ; line\nsecond"
    job = host.start_detached(
        'printf %s "$SECRET" > tmp; mv tmp seen; while [ ! -e go ]; do sleep 0.05; done',
        workdir,
        {"SECRET": secret, "PLAIN": "x"},
    )
    wait_for_file(Path(workdir, "seen"))
    assert Path(workdir, "seen").read_text() == secret
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "p@ss" not in processes
    assert stat.S_IMODE(os.stat(Path(workdir, "job.env")).st_mode) == 0o600
    assert os.getpgid(job.pid) == job.pid  # kill() relies on the pid being the process group
    Path(workdir, "go").touch()
    assert wait_for_exit(job) == 0


def test_start_detached_rejects_bad_variable_names(host, workdir):
    with pytest.raises(ValueError, match="BAD-NAME"):
        host.start_detached("true", workdir, {"BAD-NAME": "x"})


@pytest.mark.parametrize("exit_code", [0, 5])
def test_poll_notices_the_exit_quickly_and_cheaply(host, workdir, exit_code):
    job = host.start_detached(f"echo working; sleep 0.5; exit {exit_code}", workdir, {})
    started = time.monotonic()
    for _ in range(1000):
        assert job.poll() is None
    assert wait_for_exit(job) == exit_code
    assert time.monotonic() - started >= 0.5
    assert Path(job.log_path).read_text() == "working\n"
    assert Path(workdir, "exit_code").read_text() == f"{exit_code}\n"


def test_job_survives_lost_and_closed_connections(host, sshd, workdir):
    dropped = host.start_detached("sleep 1; exit 7", f"{workdir}/dropped", {})
    sshd.drop_connections()
    assert wait_for_exit(dropped) == 7

    closed = host.start_detached("sleep 1; exit 8", f"{workdir}/closed", {})
    host.close()
    host.connect(time.monotonic() + 10)
    assert wait_for_exit(closed) == 8
    time.sleep(0.5)  # the waiters of lost sessions notice and end
    assert processes_under(Path(workdir)) == []


def test_kill_ends_the_whole_process_group(host, workdir):
    job = host.start_detached("sleep 1000 & sleep 1000", workdir, {})
    deadline = time.monotonic() + 5
    while len(process_group(job.pid)) < 4:  # runner, script, two sleeps
        assert time.monotonic() < deadline
        time.sleep(0.01)
    job.kill()
    assert wait_for_exit(job, timeout=2) == 143
    assert process_group(job.pid) == []
    job.kill()  # a finished job is left alone


def test_kill_escalates_when_the_job_ignores_term(host, workdir, monkeypatch):
    monkeypatch.setattr("snakemake_executor_plugin_vastai.remote.KILL_GRACE_S", 0.5)
    job = host.start_detached("trap '' TERM; sleep 1000", workdir, {})
    wait_for_file(Path(workdir, "job.log"))
    started = time.monotonic()
    job.kill()
    assert time.monotonic() - started >= 0.5
    assert wait_for_exit(job, timeout=2) == 137
    assert process_group(job.pid) == []


def test_read_from_streams_a_growing_log(host, workdir):
    job = host.start_detached("for i in 1 2 3 4 5; do echo line $i; sleep 0.1; done", workdir, {})
    streamed, chunks = b"", 0
    while True:
        done = job.poll() is not None
        chunk = host.read_from(job.log_path, len(streamed))
        streamed += chunk
        chunks += bool(chunk)
        if done:
            break
        time.sleep(0.05)
    assert streamed.decode() == "".join(f"line {i}\n" for i in range(1, 6))
    assert chunks >= 3
    assert host.read_from(f"{workdir}/no such log", 0) == b""


# -- files ------------------------------------------------------------------------------------


def test_put_and_get_a_file_with_spaces_keeps_content_and_mode(host, tmp_path):
    local = tmp_path / "my file (1).txt"
    local.write_text("hello 'world'\n")
    local.chmod(0o754)
    remote = f"{tmp_path}/remote side/a b/my file (1).txt"
    host.put_file(local, remote)
    assert Path(remote).read_text() == "hello 'world'\n"
    assert stat.S_IMODE(os.stat(remote).st_mode) == 0o754

    back = tmp_path / "back here" / "copy of it.txt"
    host.get_file(remote, back)
    assert back.read_text() == "hello 'world'\n"
    assert stat.S_IMODE(back.stat().st_mode) == 0o754

    with pytest.raises(RemoteError, match="missing"):
        host.get_file(f"{tmp_path}/missing", tmp_path / "back here" / "missing")
    assert sorted(p.name for p in back.parent.iterdir()) == ["copy of it.txt"]


def test_get_a_directory_tree(host, tmp_path):
    tree = tmp_path / "tree"
    for relative, content in {
        "top.txt": "top",
        "a dir/inner.txt": "inner",
        "a dir/deeper/deepest.bin": "\0\1\2",
    }.items():
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_text(content)
    (tree / "empty").mkdir()

    remote = f"{tmp_path}/remote tree"  # the test sshd serves this machine's own files
    shutil.copytree(tree, remote)
    Path(remote, "link.txt").symlink_to(Path(remote, "top.txt"))
    host.get_tree(remote, tmp_path / "copy")

    assert snapshot(tmp_path / "copy") == {**snapshot(tree), "link.txt": b"top"}


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in root.rglob("*")
    }


def test_large_file_round_trip_is_byte_identical(host, tmp_path):
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(20 * 1024 * 1024))
    sent, received = host.bytes_sent, host.bytes_received
    host.put_file(local, f"{tmp_path}/remote/big.bin")
    host.get_file(f"{tmp_path}/remote/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    assert host.bytes_sent - sent == host.bytes_received - received == 20 * 1024 * 1024
