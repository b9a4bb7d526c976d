"""The laptop slept (issue 20, item 11): a run suspended for longer than ``--vastai-deadman``
finds its instance destroyed by the instance's own dead-man switch, as it should be. On waking
it says so, asks whether the computer was asleep, and does not exclude that machine from the
rest of the run: the host did nothing wrong. (It used to say "no longer listed by Vast.ai
(destroyed outside this run?)" and exclude the machine for the rest of the run.)

A real run stopped with SIGSTOP while its job runs, as a sleeping computer stops it, and
continued with SIGCONT once the fake shows the instance destroyed by its own key; and the
heartbeat to such a vanished host, which must not hold its connection for long.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import paramiko
import pytest

from snakemake_executor_plugin_vastai.pool.deadman import Heartbeat
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.remote.ssh import Endpoint, RemoteHost
from tests.fakevast.harness import FakeVast
from tests.test_pool_decisions import SIG
from tests.workflows import (
    ANNOUNCE_START,
    assert_all_destroyed,
    one_rule_workflow,
    rented,
    run_summary,
    running_snakemake,
    wait_until_running,
)

DEADMAN = 10
SLEPT = "its dead-man switch destroyed it: this run gave it no sign of life for"
# The first attempt runs until the run is suspended; the retry (attempt 2) finishes at once.
SLEEPY_FIRST_ATTEMPT = (
    f"{ANNOUNCE_START}; if [ {{resources.attempt}} -eq 1 ]; then sleep 300; fi; "
    "echo ok > {output}"
)
HOUR = 3600.0
ATTEMPT = "attempt=lambda wildcards, attempt: attempt"


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_a_run_that_slept_past_the_deadman_says_so_and_excludes_no_machine(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", SLEEPY_FIRST_ATTEMPT, resources=ATTEMPT)
    options = ("--vastai-deadman", str(DEADMAN), "--retries", "1")

    with running_snakemake(workdir, fakevast, *options, jobs=1) as run:
        wait_until_running(fakevast, workdir, run)
        os.kill(run.pid, signal.SIGSTOP)
        try:
            fakevast.wait_for(lambda: not fakevast.alive_instances(), DEADMAN + 30, interval=0.5)
        finally:
            os.kill(run.pid, signal.SIGCONT)
        returncode = run.wait(timeout=120)
    output = output_of(workdir)

    assert returncode == 0, output
    assert SLEPT in output, output
    assert f"longer than --vastai-deadman ({DEADMAN} s). Was this computer asleep" in output
    assert "destroyed outside this run" not in output, output
    assert "Not renting from machine" not in output, output
    assert run_summary(workdir)["excluded_hosts"] == {}
    slept, retried = assert_all_destroyed(fakevast, workdir)
    assert slept["destroyed_by"] == "container", rented(fakevast)
    assert retried["destroyed_by"] == "user", rented(fakevast)
    assert (workdir / "out.txt").read_text() == "ok\n"


def test_a_heartbeat_to_a_vanished_host_lets_go_of_its_connection_soon(
    ssh_key: paramiko.PKey,
) -> None:
    """On waking, the heartbeat's touch of a destroyed instance reconnects for its own few
    seconds (RECONNECT_SECONDS), not for the host's reconnect budget: meanwhile it holds the
    host's connection, which the job re-attaching to learn its fate (and the teardown closing
    it) wait for. The host's budget here is an hour, so a touch that used it would hold the
    connection past the join below (a hang detector, not a speed figure)."""
    with socket.socket() as gone:  # a port nothing listens on once it is closed
        gone.bind(("127.0.0.1", 0))
        port = gone.getsockname()[1]
    instance = Instance("snakemake-vastai:test:vanished", SIG)
    instance.host = RemoteHost(
        instance.name, [Endpoint("127.0.0.1", port)], ssh_key, reconnect_timeout=HOUR
    )

    Heartbeat().beat([instance])
    time.sleep(0.5)  # its touch is reconnecting
    closing = threading.Thread(target=instance.host.close)  # waits for the touch to let go
    closing.start()
    closing.join(HOUR / 10)

    assert not closing.is_alive(), "the touch held the connection for the host's whole budget"
    assert instance.heartbeat_at is None


def output_of(workdir: Path) -> str:
    return (workdir / "snakemake.out").read_text()
