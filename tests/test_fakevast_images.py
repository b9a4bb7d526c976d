"""Images as the fake serves them: ``vastai/pytorch`` is like the real one (a venv at /venv/main
with a module no other Python has, its PATH only in the main process's environment, a session's
PATH without it), ``bare/`` and other images have none of that, and ``nossh/`` images have no
sshd and no apt-get at all. Real HTTP and SSH, no mocks."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from vastai import VastAI

from snakemake_executor_plugin_vastai.remote.bootstrap import ONSTART_SCRIPT
from tests.fakevast import container as container_module
from tests.fakevast.clients import public_key, rent, run, sdk, ssh_login, wait_for, wait_status
from tests.fakevast.harness import FakeVast

pytestmark = [
    pytest.mark.skipif(
        not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd at /usr/sbin/sshd"
    ),
    pytest.mark.skipif(
        not container_module.namespaces_available(), reason="needs root to create namespaces"
    ),
]

PYTORCH = "vastai/pytorch:@vastai-automatic-tag"
NO_SSHD = "nossh/alpine:3.20"
NO_SSHD_MARKER = "snakemake-vastai: this image has no sshd and no apt-get"
VENV_BIN = "/venv/main/bin"
STUB = "vast_torch_stub"
# What the onstart script (a child of the main process) sees: the image's PATH.
ONSTART = '{ echo "$PATH"; command -v python3; } > /root/onstart-saw'


@pytest.fixture
def vast(fakevast: FakeVast) -> VastAI:
    return sdk(fakevast)


@pytest.fixture
def login(vast: VastAI, ssh_key: paramiko.PKey) -> Iterator[Callable[[str], paramiko.SSHClient]]:
    """Rent a running ssh instance of an image and log in as root; destroys them all."""
    made: list[tuple[int, paramiko.SSHClient]] = []

    def start(image: str) -> paramiko.SSHClient:
        instance_id = rent(vast, image=image, onstart_cmd=ONSTART)
        vast.attach_ssh(instance_id, public_key(ssh_key))
        row = wait_status(vast, instance_id, "running")
        client = ssh_login(row["ssh_host"], row["ssh_port"], ssh_key)
        made.append((instance_id, client))
        return client

    yield start
    for instance_id, client in made:
        client.close()
        vast.destroy_instance(instance_id)


def status(client: paramiko.SSHClient, command: str) -> tuple[int, str, str]:
    _, stdout, stderr = client.exec_command(command, timeout=30)
    out, err = stdout.read().decode(), stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


def main_path(client: paramiko.SSHClient) -> list[str]:
    """PATH in the environment of the instance's main process (PID 1)."""
    line = run(client, "tr '\\0' '\\n' < /proc/1/environ | sed -n 's/^PATH=//p'")
    return line.strip().split(":")


def onstart_saw(client: paramiko.SSHClient) -> list[str]:
    wait = "for i in $(seq 100); do [ -s /root/onstart-saw ] && break; sleep 0.1; done"
    return run(client, f"{wait}; cat /root/onstart-saw").splitlines()


def test_pytorch_image_has_its_venv_and_keeps_its_path_out_of_sessions(login) -> None:
    client = login(PYTORCH)

    session_path = run(client, "echo $PATH").strip().split(":")
    assert VENV_BIN not in session_path and "/usr/local/bin" in session_path
    image_path = main_path(client)
    assert image_path[0] == VENV_BIN and set(session_path) <= set(image_path)
    # The onstart script inherits the image's PATH, so its python3 is the venv's.
    assert onstart_saw(client) == [":".join(image_path), f"{VENV_BIN}/python3"]

    for python in (f"{VENV_BIN}/python", f"{VENV_BIN}/python3"):
        code = f"import {STUB}, sys; print({STUB}.__version__, sys.prefix)"
        assert run(client, f"{python} -c {shlex.quote(code)}") == "0.0-fake /venv/main\n"
    # Snakemake installed on this machine stays importable from the venv.
    assert run(client, f"{VENV_BIN}/python -c 'import snakemake'") == ""
    # No other Python on the instance can import the stub: the session's python3 (this
    # machine's, with Snakemake), nor the distribution's.
    assert run(client, "command -v python3") != f"{VENV_BIN}/python3\n"
    run(client, "python3 -c 'import snakemake'")
    for python in ("python3", "python", "/usr/bin/python3"):
        code, _, err = status(client, f"{python} -c 'import {STUB}'")
        assert code != 0 and f"No module named '{STUB}'" in err, (python, err)
    # With the image's PATH (what a client reads from /proc/1/environ), python3 is the venv's.
    with_image_path = f'PATH="{":".join(image_path)}" python3 -c "import {STUB}"'
    assert status(client, with_image_path)[0] == 0
    # The venv names only paths the instance sees, not the fake's state dir.
    config = run(client, "cat /venv/main/pyvenv.cfg /venv/main/bin/activate")
    assert "include-system-site-packages = true" in config
    assert "upper" not in config and 'VIRTUAL_ENV="/venv/main"' in config


@pytest.mark.parametrize("image", ["bare/python:3.11", "vastai/base-image:cuda-12.4.1-auto"])
def test_other_images_have_no_venv_and_one_path(login, image: str) -> None:
    client = login(image)

    assert status(client, "test -e /venv")[0] != 0
    session_path = run(client, "echo $PATH").strip().split(":")
    assert main_path(client) == session_path and VENV_BIN not in session_path
    assert onstart_saw(client) == [":".join(session_path), "/usr/local/bin/python3"]
    code, _, err = status(client, f"python3 -c 'import {STUB}'")
    assert code != 0 and f"No module named '{STUB}'" in err


def test_pytorch_image_in_args_mode_runs_with_its_path(vast: VastAI) -> None:
    """In args mode the command is the main process: it has the image's PATH, as on Vast."""
    script = f"echo \"$PATH\"; python3 -c 'import {STUB}; print({STUB}.__version__)'"
    instance_id = rent(
        vast, image=PYTORCH, runtype="args", onstart_cmd="/bin/sh", args=["-c", script]
    )
    wait_status(vast, instance_id, "exited")
    assert vast.logs(instance_id).splitlines() == [
        f"{VENV_BIN}:{container_module.DEFAULT_PATH}",
        "0.0-fake",
    ]
    vast.destroy_instance(instance_id)


def test_the_venv_is_built_without_a_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the image's venv (once per instance) writes a few files and links and runs
    no subprocess (venv's own ensurepip would start one and take seconds)."""

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a subprocess: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    venv = tmp_path / "venv"

    container_module._build_image_venv(venv, "/venv/main")

    assert (venv / "bin" / "python").exists() and (venv / "pyvenv.cfg").is_file()
    assert list(venv.glob(f"lib/python*/site-packages/{container_module.TORCH_STUB}.py"))


def test_image_without_sshd_runs_but_nothing_answers_ssh(vast: VastAI, ssh_key) -> None:
    """A ``nossh/`` image reaches running with both endpoints advertised, but no sshd is behind
    them; the plugin's onstart script finds neither sshd nor apt-get and says so in the log."""
    probe = (
        "for p in /usr/sbin/sshd /sbin/sshd /usr/bin/sshd /usr/bin/apt-get /bin/apt-get; do\n"
        '  if [ -e "$p" ]; then echo "present: $p"; fi\n'
        "done\n"
        'echo "onstart done in $CONTAINER_ID"\n'
    )
    instance_id = rent(
        vast,
        query="gpu_name=RTX_4090 num_gpus=1 direct_port_count>=1",
        runtype="ssh_direc ssh_proxy",
        image=NO_SSHD,
        onstart_cmd=ONSTART_SCRIPT + probe,
    )
    try:
        vast.attach_ssh(instance_id, public_key(ssh_key))
        row = wait_status(vast, instance_id, "running")
        assert row["status_msg"] == "success, running nossh/alpine_3.20/ssh"
        direct_port = int(row["ports"]["22/tcp"][0]["HostPort"])
        for port in (row["ssh_port"], direct_port):
            with pytest.raises((paramiko.SSHException, OSError, EOFError)):
                ssh_login(row["ssh_host"], port, ssh_key, timeout=3).close()

        def log() -> str:
            text = vast.logs(instance_id, tail="1000")
            assert isinstance(text, str), text
            return text

        assert wait_for(lambda: f"onstart done in {instance_id}" in log(), timeout=10), log()
        text = log()
        assert NO_SSHD_MARKER in text and "present:" not in text, text
        assert vast.show_instance(instance_id)["actual_status"] == "running"
    finally:
        vast.destroy_instance(instance_id)
