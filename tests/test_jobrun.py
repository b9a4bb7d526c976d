"""A job's thread always ends with an outcome and always gives its share back (jobrun.py).

Why: Snakemake waits for every job's outcome and the pool for every share. A job thread that
died before its outcome hung the run; one that kept its share kept its instance BUSY for ever,
so at the instance cap the next job waited for ever. Both are real runs of Snakemake against
the fake marketplace, with a timeout in place of a hang, and end with nothing alive in it.
"""

from __future__ import annotations

from pathlib import Path

from tests.close_raises import MARKER
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    JOB_LOGS,
    assert_all_destroyed,
    assert_nothing_rented,
    job_errors,
    one_rule_workflow,
    run_snakemake,
    write_workflow,
)
from tests.wrapped import run_wrapped

JOBS = 3
# Independent jobs, one at a time (--jobs 1) on at most one instance: each job after the
# first needs the share the one before it gave back.
SNAKEFILE = f"""\
rule all:
    input: expand("out/{{i}}.txt", i=range({JOBS}))


rule make:
    output: "out/{{i}}.txt"
    resources: gpu=1
    shell: "echo {{wildcards.i}} > {{output}}"
"""
TIMEOUT_SECONDS = 300  # a normal run takes well under a minute; a leaked share waits for ever


def test_a_stream_close_that_raises_still_gives_the_share_back(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = write_workflow(tmp_path / "wf", SNAKEFILE)

    run = run_wrapped(
        "close_raises", workdir, fakevast, "--vastai-pool-max-instances", "1", jobs=1,
        timeout=TIMEOUT_SECONDS,
    )  # fmt: skip

    assert run.ok, run.output[-5000:]
    assert run.output.count(MARKER) == JOBS, run.output[-5000:]  # every job's close raised
    assert "Exception in thread" not in run.output, run.output[-5000:]
    for i in range(JOBS):
        assert (workdir / f"out/{i}.txt").read_text() == f"{i}\n"
    assert len(assert_all_destroyed(fakevast, workdir)) == 1


def test_a_job_log_that_cannot_be_cleared_fails_the_job_instead_of_hanging(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """A file where the job logs' folder belongs: clearing the job's old log raises
    NotADirectoryError before anything is rented. The job fails, naming the path."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    blocker = workdir / JOB_LOGS
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the job logs' folder belongs\n")

    run = run_snakemake(workdir, fakevast, jobs=1, timeout=TIMEOUT_SECONDS)

    assert not run.ok, run.output
    (message,) = job_errors(run.output)
    assert "rule make" in message and "Not a directory" in message, message
    assert str(JOB_LOGS) in message, message
    assert "Exception in thread" not in run.output, run.output[-5000:]
    assert_nothing_rented(fakevast)
