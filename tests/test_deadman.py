"""The dead-man switch in real runs: a run killed by ``kill -9`` and never rerun leaves nothing
billing, because each instance destroys itself with its own scoped key once the run's
heartbeat stops; a healthy run is never touched; the user's API key never reaches a host."""

from __future__ import annotations

import shlex
from pathlib import Path

import paramiko
import pytest

from tests.fakevast.clients import sdk, ssh_login
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    ANNOUNCE_START,
    assert_all_destroyed,
    one_rule_workflow,
    proxy_down_fake,
    rented,
    run_snakemake,
    running_snakemake,
    wait_until_running,
)

DEADMAN = 20
BOOT_SECONDS = 10
# Looks for a secret (read from stdin, so it is in no argv) in every process's environment and
# command line and in every file the plugin put on the instance. (The fake's instances see this
# machine's own files underneath, which may hold the test key: those are not searched.)
FIND_SECRET = """\
import glob, os, sys
secret = sys.stdin.read().strip().encode()
places = glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline")
places += glob.glob(os.path.expanduser("~/.ssh/*"))
for root, _, names in os.walk(os.path.expanduser("~/snakemake-vastai")):
    places += [os.path.join(root, n) for n in names]
for path in places:
    try:
        with open(path, "rb") as handle:
            if secret in handle.read(10_000_000):
                print(path)
    except OSError:
        pass
"""


@pytest.mark.slow
def test_a_killed_run_is_destroyed_by_its_own_instances(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", f"{ANNOUNCE_START}; sleep 300; echo > {{output}}")

    with running_snakemake(workdir, fakevast, "--vastai-deadman", str(DEADMAN), jobs=1) as run:
        wait_until_running(fakevast, workdir, run)
        run.kill()  # SIGKILL: no teardown, no atexit; the instance is on its own
        run.wait(timeout=30)

    # The requirement itself, not a speed figure: within the deadman time plus 30 s.
    fakevast.wait_for(lambda: not fakevast.alive_instances(), timeout=DEADMAN + 30, interval=1)
    rows = rented(fakevast)
    assert rows and all(row["destroyed_by"] == "container" for row in rows), rows


def kill_when(fake: FakeVast, run: object, status: str) -> None:
    """SIGKILL the run the moment the fake shows its (only) instance in ``status``."""
    fake.wait_for(
        lambda: any(row["status"] == status for row in fake.alive_instances()),
        timeout=60,
        interval=0.1,
    )
    run.kill()
    run.wait(timeout=30)


def assert_ended_by_itself(fake: FakeVast, within: float) -> None:
    fake.wait_for(lambda: not fake.alive_instances(), timeout=within, interval=1)
    rows = rented(fake)
    assert rows and all(row["destroyed_by"] == "container" for row in rows), rows


@pytest.mark.slow
def test_a_run_killed_while_its_instance_loads_leaves_nothing_billing(
    fakevast_factory, tmp_path: Path
) -> None:
    """The image pull is when users give up: the watchdog starts with the container, before
    any login, and counts the silence from its first second."""
    fake = fakevast_factory(boot_seconds=BOOT_SECONDS)
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    with running_snakemake(workdir, fake, "--vastai-deadman", str(DEADMAN), jobs=1) as run:
        kill_when(fake, run, "loading")

    assert_ended_by_itself(fake, within=BOOT_SECONDS + DEADMAN + 30)


@pytest.mark.slow
def test_a_run_killed_before_its_first_login_leaves_nothing_billing(
    fakevast_factory, tmp_path: Path
) -> None:
    """Running, but the run never logged in (Vast's proxy tunnel is down, so it waits to
    reboot): nothing on the instance has heard of the run, and it still ends itself."""
    fake = proxy_down_fake(fakevast_factory, tmp_path)
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    with running_snakemake(workdir, fake, "--vastai-deadman", str(DEADMAN), jobs=1) as run:
        kill_when(fake, run, "running")

    assert not list((workdir / ".snakemake/auxiliary/vastai-logs").glob("*")), "a job started"
    assert_ended_by_itself(fake, within=DEADMAN + 30)


@pytest.mark.slow
def test_a_long_healthy_job_is_never_touched(fakevast: FakeVast, tmp_path: Path) -> None:
    """A 90 s job, four and a half deadman periods: the heartbeat keeps its instance alive
    while the run merely waits for it."""
    workdir = one_rule_workflow(tmp_path / "wf", "sleep 90; echo ok > {output}")

    run = run_snakemake(workdir, fakevast, "--vastai-deadman", str(DEADMAN), jobs=1)

    assert run.ok, run.output
    assert (workdir / "out.txt").read_text() == "ok\n"
    rows = assert_all_destroyed(fakevast, workdir)
    assert [row["destroyed_by"] for row in rows] == ["user"]


def test_the_users_key_is_nowhere_on_the_instance(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", f"{ANNOUNCE_START}; sleep 300; echo > {{output}}")

    with running_snakemake(workdir, fakevast, "--vastai-deadman", str(DEADMAN), jobs=1) as run:
        instance_id = wait_until_running(fakevast, workdir, run)
        [key_file] = [p for p in (workdir / ".snakemake/vastai/keys").iterdir() if not p.suffix]
        row = sdk(fakevast).show_instance(id=instance_id)
        client = ssh_login(
            row["ssh_host"], row["ssh_port"], paramiko.Ed25519Key.from_private_key_file(key_file)
        )
        try:
            stdin, stdout, _ = client.exec_command("python3 -c " + shlex.quote(FIND_SECRET))
            stdin.write(fakevast.api_key + "\n")
            stdin.channel.shutdown_write()
            found = stdout.read().decode().split()
            stdin, stdout, _ = client.exec_command("python3 -c " + shlex.quote(FIND_SECRET))
            stdin.write("CONTAINER_API_KEY=\n")  # the search itself works: PID 1 has this one
            stdin.channel.shutdown_write()
            control = stdout.read().decode().split()
            # Started by the onstart script, adopted by the bootstrap: one, not two.
            _, stdout, _ = client.exec_command("pgrep -cf 'watchdog-[^ ]*[.]py'")
            watchdogs = stdout.read().decode().strip()
        finally:
            client.close()
        run.terminate()
        run.wait(timeout=120)

    assert found == []
    assert "/proc/1/environ" in control
    assert watchdogs == "1", watchdogs
    assert_all_destroyed(fakevast, workdir)
