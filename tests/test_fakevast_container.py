"""The fake marketplace's instance runtime and relays, driven with a real sshd and paramiko."""

from __future__ import annotations

import contextlib
import getpass
import io
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fakevast import container as container_module
from tests.fakevast.clients import wait_for
from tests.fakevast.container import Container, ContainerError, ContainerSpec
from tests.fakevast.relay import Relay, TrafficCounter

pytestmark = pytest.mark.skipif(
    not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd at /usr/sbin/sshd"
)
needs_namespaces = pytest.mark.skipif(
    not container_module.namespaces_available(), reason="needs root to create namespaces"
)

DEFAULT_IMAGE = "vastai/pytorch:@vastai-automatic-tag"
BARE_IMAGE = "bare/ubuntu:22.04"


@dataclass(frozen=True)
class Key:
    pkey: paramiko.PKey
    public_line: str


def new_key() -> Key:
    """A fresh ed25519 key; paramiko loads it, as it cannot generate ed25519 keys itself."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(private.decode()))
    return Key(pkey=pkey, public_line=f"{public.decode()} fakevast-test")


def run(client: paramiko.SSHClient, command: str) -> tuple[int, str, str]:
    _, stdout, stderr = client.exec_command(command, timeout=30)
    out, err = stdout.read().decode(), stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


def host_processes_running(argv: str) -> list[int]:
    """Host pids whose command line is exactly `argv` (space-joined)."""
    wanted = (argv.replace(" ", "\0") + "\0").encode()
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and Path(f"/proc/{entry}/cmdline").read_bytes() == wanted:
                pids.append(int(entry))
    return pids


def mount_holders(path: Path) -> list[int]:
    """Host pids whose mount namespace has a mount mentioning `path`."""
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and str(path) in Path(f"/proc/{entry}/mountinfo").read_text():
                pids.append(int(entry))
    return pids


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def key() -> Key:
    return new_key()


@pytest.fixture
def containers(tmp_path: Path, key: Key) -> Iterator[Callable[..., Container]]:
    """Starts containers (authorized for `key` unless told otherwise); destroys them all."""
    made: list[Container] = []

    def make(
        image: str = DEFAULT_IMAGE,
        *,
        ssh: bool = True,
        onstart: str | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        keys: list[str] | None = None,
        isolate: bool | None = None,
    ) -> Container:
        spec = ContainerSpec(
            instance_id=len(made) + 1,
            image=image,
            ssh=ssh,
            onstart=onstart,
            args=args,
            env=env or {},
            authorized_keys=[key.public_line] if keys is None else keys,
        )
        container = Container(spec, tmp_path / f"instance-{spec.instance_id}", isolate=isolate)
        made.append(container)
        container.start()
        return container

    yield make
    for container in made:
        container.destroy()


@pytest.fixture
def counter() -> TrafficCounter:
    return TrafficCounter()


@pytest.fixture
def relays(counter: TrafficCounter) -> Iterator[Callable[[int], Relay]]:
    made: list[Relay] = []

    def make(port: int) -> Relay:
        made.append(Relay(("127.0.0.1", port), counter))
        return made[-1]

    yield make
    for relay in made:
        relay.close()


@pytest.fixture
def ssh(
    containers: Callable[..., Container], key: Key
) -> Iterator[Callable[..., paramiko.SSHClient]]:
    """Opens paramiko sessions (closed before the containers are destroyed)."""
    clients: list[paramiko.SSHClient] = []

    def connect(
        port: int, pkey: paramiko.PKey = key.pkey, user: str = "root"
    ) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        clients.append(client)
        client.connect(
            "127.0.0.1",
            port,
            username=user,
            pkey=pkey,
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
            banner_timeout=10,
            auth_timeout=10,
        )
        return client

    yield connect
    for client in clients:
        client.close()


@needs_namespaces
def test_default_image_session_sees_env_path_and_snakemake(containers, relays, ssh) -> None:
    tricky = """a b 'single' "double" \\back $dollar # hash"""
    instance = containers(env={"FOO": tricky})
    client = ssh(relays(instance.sshd_port).port)

    assert run(client, 'printf %s "$FOO"')[1] == tricky
    path = run(client, "echo $PATH")[1].strip().split(":")
    assert {"/usr/local/bin", "/usr/sbin"} <= set(path)
    status, _, err = run(client, 'python -c "import snakemake"')
    assert status == 0, err
    assert run(client, "test -d /workspace && cat /etc/environment")[1].startswith("HOME=")
    assert instance.isolated


@needs_namespaces
def test_bare_image_python_has_pip_but_no_snakemake(containers, ssh) -> None:
    client = ssh(containers(BARE_IMAGE).sshd_port)

    status, _, err = run(client, 'python -c "import snakemake"')
    assert status != 0
    assert "No module named 'snakemake'" in err
    assert run(client, "python -m pip --version")[0] == 0


@needs_namespaces
def test_onstart_runs_with_the_env_and_is_logged(containers) -> None:
    instance = containers(onstart='echo "onstart says $FOO"', env={"FOO": "hello"})

    assert wait_for(lambda: "onstart says hello" in instance.log_text(), timeout=5.0)
    assert "Server listening" in instance.log_text()


@needs_namespaces
def test_instances_are_private_and_destroy_leaves_nothing(containers, ssh, tmp_path) -> None:
    assert not Path("/root/hello.txt").exists()
    first, second = containers(), containers()
    client = ssh(first.sshd_port)
    write = "echo hi > /root/hello.txt && echo x > /workspace/x && cat /root/hello.txt"
    assert run(client, write)[:2] == (0, "hi\n")
    run(client, "setsid nohup sleep 987654 >/dev/null 2>&1 < /dev/null &")

    assert run(ssh(second.sshd_port), "ls /root/hello.txt /workspace/x")[0] != 0
    assert not Path("/root/hello.txt").exists()
    assert not Path("/workspace/x").exists()
    assert wait_for(lambda: bool(host_processes_running("sleep 987654")))
    state = tmp_path / "instance-1"
    assert mount_holders(state)

    client.close()
    first.destroy()
    first.destroy()

    assert not host_processes_running("sleep 987654")
    assert refuses_connections(first.sshd_port)
    assert not mount_holders(state)
    assert not state.exists()
    assert not first.is_running()
    assert run(ssh(second.sshd_port), "echo still here")[1] == "still here\n"


@needs_namespaces
def test_nohup_job_outlives_its_session(containers, ssh) -> None:
    instance = containers()
    first = ssh(instance.sshd_port)
    run(first, "nohup sleep 987655 >/dev/null 2>&1 &")
    first.close()

    assert wait_for(lambda: bool(host_processes_running("sleep 987655")))
    assert run(ssh(instance.sshd_port), "pgrep -f 'sleep 987655'")[0] == 0


@needs_namespaces
def test_finished_background_jobs_do_not_linger_as_zombies(containers, ssh) -> None:
    client = ssh(containers().sshd_port)
    pid = run(client, "sh -c 'sleep 0.1 >/dev/null 2>&1 & echo $!'")[1].strip()

    check = f"for i in $(seq 50); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.1; done; exit 1"
    assert run(client, check)[0] == 0


@needs_namespaces
def test_key_added_after_start_lets_a_second_key_in(containers, ssh) -> None:
    instance = containers()
    other = new_key()
    with pytest.raises(paramiko.AuthenticationException):
        ssh(instance.sshd_port, other.pkey)

    instance.add_authorized_key(other.public_line)

    assert run(ssh(instance.sshd_port, other.pkey), "whoami")[1] == "root\n"


@needs_namespaces
def test_args_mode_runs_the_command_and_exits(containers) -> None:
    instance = containers(ssh=False, onstart="/bin/sh", args=["-c", "echo hi; exit 3"])

    assert wait_for(lambda: not instance.is_running(), timeout=5.0)
    assert "hi" in instance.log_text()
    assert instance.sshd_port is None


def test_args_mode_without_a_command_is_refused(tmp_path) -> None:
    spec = ContainerSpec(1, DEFAULT_IMAGE, False, None, None, {}, [])
    instance = Container(spec, tmp_path / "instance")
    with pytest.raises(ContainerError, match="needs a command"):
        instance.start()
    instance.destroy()
    assert not (tmp_path / "instance").exists()


@needs_namespaces
def test_sshd_failure_is_reported_with_its_log(containers, monkeypatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        monkeypatch.setattr(container_module, "_free_port", lambda: busy.getsockname()[1])
        with pytest.raises(ContainerError, match=r"(?s)failed to start.*Address already in use"):
            containers()


@needs_namespaces
def test_a_port_taken_before_sshd_binds_it_costs_a_second_start_not_a_failure(
    containers, ssh, monkeypatch
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        picks = iter([busy.getsockname()[1]])
        free = container_module._free_port
        monkeypatch.setattr(container_module, "_free_port", lambda: next(picks, None) or free())
        instance = containers()
        assert instance.sshd_port != busy.getsockname()[1]
        assert run(ssh(instance.sshd_port), "echo up")[1] == "up\n"
        assert "Address already in use" not in instance.log_text()


@needs_namespaces
def test_kill_sshd_drops_live_sessions(containers, ssh) -> None:
    instance = containers()
    transport = ssh(instance.sshd_port).get_transport()

    instance.kill_sshd()

    assert wait_for(lambda: not transport.is_active(), timeout=5.0)
    assert refuses_connections(instance.sshd_port)
    assert instance.is_running()


@needs_namespaces
def test_relay_counts_bytes_both_ways(containers, relays, ssh, counter) -> None:
    client = ssh(relays(containers().sshd_port).port)
    with client.open_sftp() as sftp:
        sftp.putfo(io.BytesIO(b"u" * 100_000), "/workspace/up")

    assert len(run(client, "head -c 150000 /dev/zero")[1]) == 150_000
    assert run(client, "wc -c < /workspace/up")[1].strip() == "100000"
    assert counter.snapshot()["up"] > 100_000
    assert counter.snapshot()["down"] > 150_000


@needs_namespaces
def test_bandwidth_cap_slows_a_live_sftp_upload(containers, relays, ssh) -> None:
    relay = relays(containers().sshd_port)
    payload = b"b" * 150_000

    def upload_seconds() -> float:
        started = time.monotonic()
        with ssh(relay.port).open_sftp() as sftp:
            sftp.putfo(io.BytesIO(payload), "/workspace/blob")
        return time.monotonic() - started

    uncapped = upload_seconds()
    relay.set_bandwidth(100_000)
    capped = upload_seconds()

    assert capped > 1.2
    assert capped > 2 * uncapped


@needs_namespaces
def test_cap_applies_to_a_connection_already_open(containers, relays, ssh) -> None:
    relay = relays(containers().sshd_port)
    client = ssh(relay.port)
    relay.set_bandwidth(50_000)

    started = time.monotonic()
    assert len(run(client, "head -c 50000 /dev/zero")[1]) == 50_000
    assert time.monotonic() - started > 0.6


@needs_namespaces
def test_cut_connections_breaks_live_sessions_only(containers, relays, ssh) -> None:
    relay = relays(containers().sshd_port)
    transport = ssh(relay.port).get_transport()

    assert relay.cut_connections() == 1

    assert wait_for(lambda: not transport.is_active(), timeout=5.0)
    assert run(ssh(relay.port), "echo back")[1] == "back\n"


def test_closed_relay_refuses_connections(counter) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        relay = Relay(target.getsockname(), counter)
        relay.close()
        relay.close()
    assert refuses_connections(relay.port)


@pytest.fixture
def privsep_dir() -> None:
    """A root sshd needs /run/sshd, and unisolated instances run on the host. It is left in
    place: other sshds on this machine may be using it by the time this test ends."""
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


@pytest.mark.filterwarnings("ignore:fakevast:RuntimeWarning")
def test_unisolated_fallback_serves_ssh_and_cleans_up(containers, ssh, privsep_dir) -> None:
    instance = containers(isolate=False, env={"FOO": "bar"})
    client = ssh(instance.sshd_port, user=getpass.getuser())

    home = str(instance.state_dir.resolve() / "home")
    assert run(client, 'echo "$FOO $HOME"')[1] == f"bar {home}\n"
    assert run(client, "command -v python")[1] == f"{instance.state_dir.resolve()}/bin/python\n"
    run(client, "setsid nohup sleep 987653 >/dev/null 2>&1 < /dev/null &")
    assert wait_for(lambda: bool(host_processes_running("sleep 987653")))
    client.close()

    instance.destroy()

    assert not instance.isolated
    assert not host_processes_running("sleep 987653")
    assert refuses_connections(instance.sshd_port)
    assert not instance.state_dir.exists()


@needs_namespaces
def test_a_held_namespace_is_never_mistaken_for_one_made_after_it_died() -> None:
    """The kernel hands a dead namespace's number to the next one within a second; a destroy
    that compared numbers alone SIGKILLed the PID 1 of an instance that had just started."""

    def namespace_process() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["unshare", "--pid", "--kill-child", "sleep", "60"])
        assert wait_for(lambda: _children_of(process.pid), timeout=5)
        return process

    first = namespace_process()
    held = container_module._HeldNamespace.of(_children_of(first.pid)[0])
    assert held is not None
    first.kill()
    first.wait()
    time.sleep(0.5)  # past the grace period after which an unheld number is handed out again
    second = namespace_process()
    try:
        assert not held.holds(_children_of(second.pid)[0])
        assert not held.holds(second.pid)  # unshare itself lives in this machine's namespace
    finally:
        second.kill()
        second.wait()
        held.close()


def _children_of(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []
