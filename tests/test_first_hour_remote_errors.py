"""What a user reads when a job fails on its instance or the run stops for their own mistake
(issue 20, items 6 and 7): the job's own error, once, and messages without tracebacks.

Why: a failed job used to bring along its remote Snakemake's shutdown lines ("Shutting down,
this might take some time", "WorkflowError: At least one job did not complete successfully"),
once per job, mixed into the run's own; and an error that stopped the run ended with a
fragment of the plugin's traceback (``File ".../__init__.py", line 111, in run_job``).

Real Snakemake against the fake marketplace; each test ends by checking what is left billing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.workflows import (
    JOB_LOGS,
    assert_all_destroyed,
    assert_nothing_rented,
    fatal_error,
    job_errors,
    one_rule_workflow,
    run_snakemake,
)

REMOTE_SHUTDOWN = (
    "Shutting down, this might take some time",
    "At least one job did not complete successfully",
)
COMPLAINT = "the model file is corrupt"  # what the failing command itself says, on stderr


def assert_no_traceback(output: str) -> None:
    assert "Traceback" not in output, output
    assert not re.search(r'^\s*File "', output, re.MULTILINE), output


def test_a_failed_job_shows_its_own_error_and_its_log_keeps_the_rest(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", f"echo '{COMPLAINT}' >&2; exit 3")

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.returncode != 0, run.output
    [message] = job_errors(run.output)
    assert COMPLAINT in message, message
    assert "returned non-zero exit status 3" in message, message
    for line in REMOTE_SHUTDOWN:
        assert line not in message, message
        assert run.output.count(line) == 1, run.output  # the run's own, once
    [log] = (workdir / JOB_LOGS).iterdir()
    kept = log.read_text()
    assert COMPLAINT in kept and all(line in kept for line in REMOTE_SHUTDOWN), kept
    assert_no_traceback(run.output)
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.parametrize(
    ("resources", "options", "words"),
    [
        ("gpu=1, gpu_model='H200'", (), ("No H200 offer", "Nothing was rented.")),
        ("gpu=1", ("--vastai-geolocation", "Atlantis"), ("--vastai-geolocation", "'Atlantis'")),
    ],
    ids=["no offer, at the first job", "bad option, at start"],
)
def test_a_users_mistake_is_a_message_without_a_traceback(
    fakevast: FakeVast, tmp_path: Path, resources: str, options: tuple[str, ...], words: tuple
) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}", resources=resources)

    run = run_snakemake(workdir, fakevast, *options, jobs=1)

    assert run.returncode != 0, run.output
    message = fatal_error(run.output)
    for word in words:
        assert word in message, run.output
    assert_no_traceback(run.output)
    assert_nothing_rented(fakevast)
