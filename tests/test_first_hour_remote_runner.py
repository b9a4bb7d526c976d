"""A fresh instance's first job goes to the resident runner, even when the runner is slow to
start (issue 20, item 9), and a job that does run as a plain process is told so calmly.

Why this race: the bootstrap starts the runner in the background and the run sends the first
job right after it; a runner still starting its interpreter had no socket yet, so that job ran
as a plain process with "the runner is not running (No such file or directory)". Here the
runner's interpreter is held up on purpose (a ``sitecustomize`` on the bootstrap's
PYTHONPATH that sleeps in the runner only), as a slow disk or a large image does.

Real fake instances, bootstrapped as a run does it; the fixtures end by checking that the fake
has nothing alive.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import paramiko
import pytest

from snakemake_executor_plugin_vastai.remote.bootstrap import SCRIPT_COMMAND, BootstrapPlan
from snakemake_executor_plugin_vastai.remote.staging import SourceBundle
from tests import test_jobwire
from tests.fakevast.harness import FakeVast
from tests.instances import logged_in
from tests.test_jobwire import OnInstance

workdir = test_jobwire.workdir  # a fresh workflow directory with test_jobwire's Snakefile

SLOW_START_SECONDS = 3
# Imported by every Python started with this folder on PYTHONPATH (not with -I, as the agent
# is): only the runner waits, so the rest of the bootstrap runs as usual.
SLOW_SITE = f"""\
import sys, time
if any("runner-" in arg for arg in sys.argv):
    time.sleep({SLOW_START_SECONDS})
"""


@pytest.fixture
def slow_runner_box(
    fakevast: FakeVast, ssh_key: paramiko.PKey, workdir: Path
) -> Iterator[OnInstance]:
    """An instance bootstrapped as a run does it, whose runner starts SLOW_START_SECONDS late."""
    sources = SourceBundle.build(["Snakefile"], workdir / ".snakemake" / "vastai" / "sources")
    plan = BootstrapPlan(version("snakemake"), ())
    with logged_in(fakevast, ssh_key, label="snakemake-vastai:test:slow-runner") as instance:
        site = "/tmp/slow-site"
        script = shlex.quote(SLOW_SITE)
        made = instance.host.run(f"mkdir -p {site} && printf %s {script} > {site}/sitecustomize.py")
        assert made.exit_code == 0, made.stderr
        result = instance.host.run(
            f"PYTHONPATH={site} {SCRIPT_COMMAND}", stdin=plan.script().encode(), timeout=300
        )
        assert result.exit_code == 0, result.stderr
        yield OnInstance(fakevast, instance.host, plan, sources)


def test_the_first_job_goes_to_a_runner_that_starts_late(slow_runner_box: OnInstance) -> None:
    """Sent the moment the bootstrap returns, the first job is forked by the runner."""
    first = slow_runner_box.start("first", "echo first > out", outputs=("out",))
    ended, _ = first.finish(slow_runner_box.digests)

    assert ended.code == 0, first.text()
    assert first.job.runner_note == "", first.job.runner_note
    assert Path("out").read_text() == "first\n"


def test_a_job_without_its_runner_is_told_calmly(slow_runner_box: OnInstance) -> None:
    """The runner died: the job runs as a plain process, and the note says what happens next,
    with no system error text in it."""
    slow_runner_box.sh(f"kill -9 {slow_runner_box.runner_pid()}")

    plain = slow_runner_box.start("plain", "echo plain > out", outputs=("out",))
    ended, _ = plain.finish(slow_runner_box.digests)

    assert ended.code == 0, plain.text()
    note = plain.job.runner_note
    assert note == "the runner is not running; a new one starts for the next jobs", note
