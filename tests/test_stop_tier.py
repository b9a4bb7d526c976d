"""Sleep instead of dying (issue 19, item 3), in real runs against the fake.

With ``--vastai-pool-stop-after``, an idle instance is stopped (it bills its disk only) and the
next job of its kind starts it again: no rent, no image pull. Vast.ai may have given its GPU
to another renter meanwhile; a start that does not reach ``running`` within
``--vastai-start-timeout`` gives the instance up and the job rents fresh. A stopped instance
runs nothing, so no dead-man switch guards it: a killed run leaves it billing its disk until
the next run or ``snakemake-vastai reap`` destroys it, which the help says plainly.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.workflows import (
    assert_all_destroyed,
    reap,
    rented,
    run_snakemake,
    run_summary,
    running_snakemake,
    write_workflow,
)

STOP_AFTER = ("--vastai-pool-stop-after", "2")
SECONDS_OFF = 1.5  # between the summary's and the fake's billed seconds (a list round or so)

GPU_PAUSE_GPU = """\
localrules: all, pause


rule all:
    input: "b.txt"


rule a:
    output: "a.txt"
    resources: gpu=1
    shell: "echo a > {output}"


rule pause:
    input: "a.txt"
    output: "p.txt"
    shell: "touch paused; sleep {config[pause]}; cp {input} {output}"


rule b:
    input: "p.txt"
    output: "b.txt"
    resources: gpu=1
    shell: "cat {input} > {output}; echo b >> {output}"
"""


def workflow(tmp_path: Path) -> Path:
    return write_workflow(tmp_path / "wf", GPU_PAUSE_GPU)


def pause(seconds: int) -> tuple[str, ...]:
    return ("--config", f"pause={seconds}")


def assert_billed_as_the_fake_bills(workdir: Path, fake: FakeVast) -> None:
    """The summary's GPU $ and disk $ of each instance agree with the fake's ledger, which
    bills the GPU only while the instance holds it and the disk all along."""
    billed = {row["id"]: row for row in rented(fake)}
    for row in run_summary(workdir)["instances"]:
        fake_row = billed[row["instance_id"]]
        price = row["dph_total"] / 3600
        assert abs(row["gpu_dollars"] - fake_row["gpu_cost"]) <= SECONDS_OFF * price, (
            row,
            fake_row,
        )
        assert row["storage_dollars"] == pytest.approx(fake_row["disk_cost"], rel=0.2, abs=1e-6)


def test_an_idle_instance_sleeps_and_the_next_job_starts_it_again(
    fakevast_factory, tmp_path: Path
) -> None:
    fake: FakeVast = fakevast_factory(boot_seconds=3)
    workdir = workflow(tmp_path)

    run = run_snakemake(workdir, fake, *STOP_AFTER, *pause(8), timeout=300)

    assert run.ok, run.output
    assert (workdir / "b.txt").read_text() == "a\nb\n"
    [instance] = assert_all_destroyed(fake, workdir)  # one rent for both jobs
    assert instance["restarted_at"] is not None, instance
    assert f"Stopped instance {instance['id']} after 2 s idle" in run.output
    assert f"Starting instance {instance['id']} again for b-" in run.output
    summary = run_summary(workdir)
    [row] = summary["instances"]
    assert row["jobs_run"] == 2 and row["stopped_seconds"] > 2, row
    # While stopped the fake billed its disk only: the GPU for its life less the stop.
    life = instance["ended_at"] - instance["created_at"]
    held = life - row["stopped_seconds"] + SECONDS_OFF
    assert instance["gpu_cost"] <= instance["dph_base"] * held / 3600, (instance, row)
    assert_billed_as_the_fake_bills(workdir, fake)
    assert row["dollars"] == pytest.approx(
        row["gpu_dollars"] + row["storage_dollars"] + row["data_dollars"], abs=1e-6
    )


@pytest.mark.slow  # two boots and a start timeout (README: Tests)
def test_a_start_that_hangs_gives_the_instance_up_and_the_job_rents_fresh(
    fakevast_factory, tmp_path: Path
) -> None:
    fake: FakeVast = fakevast_factory(boot_seconds=3)
    # Another renter takes the machine's GPU while the instance is stopped, for good.
    fake.set_faults({"gpu_taken_while_stopped": {"probability": 1}})
    workdir = workflow(tmp_path)

    run = run_snakemake(
        workdir, fake, *STOP_AFTER, "--vastai-start-timeout", "5", *pause(8), timeout=300
    )

    assert run.ok, run.output
    assert (workdir / "b.txt").read_text() == "a\nb\n"
    first, second = assert_all_destroyed(fake, workdir)
    assert first["restarted_at"] is None, "the hung start never ran"
    assert "did not run again within --vastai-start-timeout" in run.output
    assert second["machine_id"] != first["machine_id"]
    assert "Traceback" not in run.output
    # It never got its GPU back: after its stop it billed its disk only, here and at the fake.
    assert_billed_as_the_fake_bills(workdir, fake)


# (the interrupted run waits out a local job's 20 s: with the slowest tests, README: Tests)
@pytest.mark.parametrize("how", [pytest.param("interrupted", marks=pytest.mark.slow), "killed"])
def test_a_stopped_instance_of_a_run_that_ends_midway_is_destroyed(
    fakevast: FakeVast, tmp_path: Path, how: str
) -> None:
    """Interrupted: the teardown destroys it. Killed (no teardown, and no switch runs on a
    stopped instance): it bills its disk until 'snakemake-vastai reap', as the help says."""
    workdir = workflow(tmp_path)
    # (Snakemake lets a local job end after Ctrl-C: a short pause for the interrupted run.)
    seconds = 300 if how == "killed" else 20
    with running_snakemake(workdir, fakevast, *STOP_AFTER, *pause(seconds)) as run:
        fakevast.wait_for(
            lambda: any(i["status"] == "stopped" for i in fakevast.alive_instances()),
            timeout=60,
            interval=0.2,
        )
        if how == "killed":
            run.kill()
        else:
            run.send_signal(signal.SIGINT)
        run.wait(timeout=120)
    if how == "killed":
        [stopped] = fakevast.alive_instances()
        assert stopped["status"] == "stopped"
        assert f"Destroyed instance {stopped['id']}" in reap(workdir, fakevast)
    assert not fakevast.alive_instances()
    assert all(row["status"] == "destroyed" for row in rented(fakevast))
