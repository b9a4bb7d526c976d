"""Stopping a real ``snakemake --executor vastai`` run from outside, mid-job: whatever the
signal, the run must end soon, say so with a non-zero exit, and leave nothing rented.

SIGINT and SIGTERM both cancel the running jobs at once (Snakemake's own SIGTERM handler
would let them finish while their instances bill; the plugin takes SIGTERM over at the first
submission), and SIGHUP reaches only the plugin's own handler. The process is started
without a shell, so SIGINT is delivered as to a terminal's foreground job. A hang fails
through the wait's timeout; no assertion is made on the time itself.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakevast.clients import sdk
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    ANNOUNCE_START,
    assert_all_destroyed,
    one_rule_workflow,
    rented,
    running_snakemake,
    wait_until_running,
)


@dataclass(frozen=True)
class Stop:
    signal: signal.Signals
    says: str  # what Snakemake or the plugin prints about the stop


STOPS = {
    "SIGINT": Stop(signal.SIGINT, "Terminating processes on user request"),
    "SIGTERM": Stop(signal.SIGTERM, "SIGTERM: cancelling the run"),
    "SIGHUP": Stop(signal.SIGHUP, "SIGHUP: destroying every Vast.ai instance"),
}


@pytest.mark.parametrize("stop", STOPS.values(), ids=STOPS.keys())
def test_signal_mid_job_destroys_everything(fakevast: FakeVast, tmp_path: Path, stop: Stop) -> None:
    """However the run is stopped, nothing may keep billing after the process is gone."""
    workdir = one_rule_workflow(
        tmp_path / "wf", f"{ANNOUNCE_START}; sleep 60; echo ok > {{output}}"
    )

    with running_snakemake(workdir, fakevast, jobs=1) as process:
        wait_until_running(fakevast, workdir, process)
        process.send_signal(stop.signal)
        returncode = process.wait(timeout=50)  # well before the 60 s job could end
    output = (workdir / "snakemake.out").read_text()

    assert returncode != 0, output
    assert stop.says in output, output
    assert not (workdir / "out.txt").exists(), output
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow
def test_ctrl_c_while_the_destroy_is_rate_limited(fakevast: FakeVast, tmp_path: Path) -> None:
    """Vast.ai answers a burst of destroys with 429: the plugin must retry until the instance
    is gone before it exits, whichever thread began the destroy."""
    workdir = one_rule_workflow(
        tmp_path / "wf", f"{ANNOUNCE_START}; sleep 60; echo ok > {{output}}"
    )
    rate_limited = {"status": 429, "count": 1, "retry_after": 3}
    try:
        with running_snakemake(workdir, fakevast, jobs=1) as process:
            wait_until_running(fakevast, workdir, process)
            fakevast.set_faults(
                {"http": [{**rate_limited, "endpoint": "DELETE /api/v0/instances/{id}/"}]}
            )
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=60)
        assert returncode != 0
        assert_all_destroyed(fakevast, workdir)
    finally:  # what the plugin left behind must not fail the fixture as well
        for instance in rented(fakevast):
            if instance["status"] != "destroyed":
                sdk(fakevast).destroy_instance(instance["id"])
