"""The resident runner's pid-file lock stays with the runner: a job it forked never holds it.

Why: the lock (``flock`` on ``runner-<key>.pid``) is how a runner started later (by an agent
that found the runner dead, or by the runner's own restart) knows whether one still serves.
The lock belongs to the open file, and a fork shares it: a forked job that kept the file open
kept the lock after its runner died, so the successor gave up at once and every job until the
last forked one ended ran as a plain process, silently.

A real instance of the fake, bootstrapped as a run does it (the ``box`` fixture of
test_jobwire.py); the fixtures end by checking that the fake has nothing alive.
"""

from __future__ import annotations

import time

from snakemake_executor_plugin_vastai.remote.staging import REMOTE_BASE
from tests import test_jobwire
from tests.test_jobwire import OnInstance, snakemake_job

# test_jobwire.py's fixtures: a bootstrapped instance, in a fresh workflow directory.
box = test_jobwire.box
workdir = test_jobwire.workdir

RELEASE = f"$HOME/{REMOTE_BASE}/release-holder"  # the holding job runs until this appears
# A revived runner takes the lock before it imports anything: seconds, even on a busy machine.
TAKEOVER_SECONDS = 30.0


def test_a_runner_killed_while_its_jobs_run_is_replaced_at_once(box: OnInstance) -> None:
    holder = box.start(
        "holder",
        f"while [ ! -e {RELEASE} ]; do sleep 0.1; done; echo held > out",
        outputs=("out",),
    )
    while holder.job.pid is None:
        assert holder.job.wait(0.5) is None, holder.text()
    assert holder.job.runner_note == ""  # forked by the runner
    dead = box.runner_pid()
    box.sh(f"kill -9 {dead}")

    # The next job finds nobody at the socket: it runs plain and revives a runner.
    fallback = box.start("fallback", snakemake_job("out/fallback.txt"), env={"SECRET": ""})
    assert fallback.finish(box.digests)[0].code == 0, fallback.text()
    assert "not running" in fallback.job.runner_note

    # The revived runner takes the lock although the job forked by the dead one still runs.
    successor = wait_for_successor(box, dead)
    assert holder.job.wait(0) is None, "the holding job must still run"
    forked = box.start("forked", snakemake_job("out/forked.txt"), env={"SECRET": ""})
    assert forked.finish(box.digests)[0].code == 0, forked.text()
    assert forked.job.runner_note == "", f"not forked by runner {successor}"

    box.sh(f"touch {RELEASE}")
    assert holder.finish(box.digests)[0].code == 0, holder.text()


def test_a_forked_job_holds_no_descriptor_of_the_pid_file(box: OnInstance) -> None:
    holder = box.start("open-files", f"while [ ! -e {RELEASE} ]; do sleep 0.1; done")
    while holder.job.pid is None:
        assert holder.job.wait(0.5) is None, holder.text()
    assert holder.job.runner_note == ""
    targets = box.sh(f"for fd in /proc/{holder.job.pid}/fd/*; do readlink $fd; done").split()
    assert targets, "the job's descriptors could not be read"
    assert not [t for t in targets if t.endswith(f"{box.plan.runner_prefix}.pid")], targets

    box.sh(f"touch {RELEASE}")
    assert holder.finish(box.digests)[0].code == 0, holder.text()


def wait_for_successor(box: OnInstance, dead: int) -> int:
    """The pid of the runner that took the lock after ``dead``; fails after TAKEOVER_SECONDS."""
    deadline = time.monotonic() + TAKEOVER_SECONDS
    while time.monotonic() < deadline:
        pid = box.sh(f"cat {box.plan.runner_prefix}.pid").strip()  # empty while rewritten
        if pid.isdigit() and int(pid) != dead and box.exists(f"/proc/{pid}"):
            return int(pid)
        time.sleep(0.2)
    log = box.sh(f"cat {box.plan.runner_prefix}.log || true")
    raise AssertionError(f"no runner took the lock within {TAKEOVER_SECONDS:g} s:\n{log}")
