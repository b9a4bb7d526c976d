"""The pool under faults and limits, seen from outside: real ``snakemake --executor vastai``
runs against the fake marketplace, judged by what the fake saw (its ledger of instances and
its request log, both with the fake's own wall-clock timestamps).

What must hold:

- a single transient API error (503, 429 without Retry-After, an offer taken between search
  and create, a create whose answer is lost after it took effect) costs a retry, never the
  run, and never leaves an instance behind; an API that keeps failing fails the job with a
  message naming the cause, in bounded time;
- ``--vastai-max-total-price`` and ``--vastai-budget`` hold at every rent;
- the instances of a run killed with ``kill -9`` are destroyed by the next run before it
  rents anything;
- Ctrl-C and SIGTERM destroy every busy instance at once (each destroy request reaches the
  marketplace long before a running job could end), and a cancel is reported as a cancel.

No test asserts on the wall time of a whole run: a hang fails through the subprocess timeout.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakevast.harness import FakeVast
from tests.test_pool_workflows import most_at_once
from tests.workflows import (
    ANNOUNCE_START,
    JOB_LOGS,
    JOB_STARTED,
    assert_all_destroyed,
    assert_nothing_rented,
    job_errors,
    rented,
    run_snakemake,
    running_snakemake,
    wait_until_running,
    write_workflow,
)

DATA = Path(__file__).with_name("data")
FLAT_OFFERS = DATA / "offers-1gpu-flat.json"  # 12 x 1 GPU at $0.40/h, storage free
OFFER_PRICE = 0.40

SEARCH = "POST /api/v0/bundles/"
CREATE = "PUT /api/v0/asks/{id}/"
DESTROY = "DELETE /api/v0/instances/{id}/"

RUN_TIMEOUT = 300  # seconds for a whole snakemake run: a hang fails here, not a slow run
NAP_SECONDS = 120  # BUSY_8's jobs: a teardown that waited for them would take this long
# Every destroy reaches the fake well before a running job could end: the teardown does not
# wait for the jobs. (Not a speed figure: on a loaded machine it takes a few seconds more.)
SIGNAL_WINDOW = NAP_SECONDS / 2
# Lines of the plugin's own shell scripts that must never reach the user's terminal.
SCRIPT_TEXT = ("set -e", "nohup", "setsid", "#!/bin/sh")


def requests_to(fake: FakeVast, endpoint: str, since: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """(position in the fake's request log, request) for every request to ``endpoint``
    from position ``since`` on."""
    calls = fake.requests()
    return [
        (n, call) for n, call in enumerate(calls) if n >= since and call["endpoint"] == endpoint
    ]


def path_id(path: str) -> int:
    """The instance (or offer) id in a concrete API path."""
    found = re.search(r"/(\d+)/?$", path)
    assert found, path
    return int(found.group(1))


def started_jobs(workdir: Path) -> int:
    """How many jobs' streamed logs show the started marker."""
    logs = workdir / JOB_LOGS
    if not logs.is_dir():
        return 0
    return sum(JOB_STARTED in log.read_text(errors="replace") for log in logs.iterdir())


def wait_started(
    fake: FakeVast, workdir: Path, process: subprocess.Popen, count: int, timeout: float
) -> None:
    """Wait until ``count`` jobs are really running on their instances."""

    def ready() -> bool:
        if process.poll() is not None:
            output = (workdir / "snakemake.out").read_text()
            raise AssertionError(f"snakemake ended before {count} jobs started:\n{output}")
        return started_jobs(workdir) >= count

    fake.wait_for(ready, timeout, interval=0.2)


def price_at_each_create(instances: list[dict[str, Any]]) -> list[float]:
    """The summed $/h of the instances alive at each create moment, the new one included."""
    totals = []
    for row in instances:
        moment = row["created_at"]
        alive = [
            other
            for other in instances
            if other["created_at"] <= moment
            and (other["ended_at"] is None or other["ended_at"] > moment)
        ]
        totals.append(sum(other["dph_total"] for other in alive))
    return totals


def fan_out(count: int, sleep: int = 0) -> str:
    """A Snakefile of ``count`` independent remote jobs; each sleeps, then writes its number."""
    return f"""\
localrules: all


rule all:
    input: expand("out/{{i}}.txt", i=range({count}))


rule work:
    output: "out/{{i}}.txt"
    shell: "sleep {sleep}; echo job {{wildcards.i}} > {{output}}"
"""


def assert_outputs(workdir: Path, count: int) -> None:
    for i in range(count):
        assert (workdir / f"out/{i}.txt").read_text() == f"job {i}\n"


# -- one transient fault on search or create ----------------------------------------------

# fault document -> (endpoint, status) the fake's request log must show it answered with
FAULTS: dict[str, tuple[dict[str, Any], str, int]] = {
    "503-search": ({"http": [{"status": 503, "count": 1, "endpoint": SEARCH}]}, SEARCH, 503),
    "503-create": ({"http": [{"status": 503, "count": 1, "endpoint": CREATE}]}, CREATE, 503),
    "429-search": ({"http": [{"status": 429, "count": 1, "endpoint": SEARCH}]}, SEARCH, 429),
    "429-create": ({"http": [{"status": 429, "count": 1, "endpoint": CREATE}]}, CREATE, 429),
    # someone else rented the offer between search and create
    "create-rejected": ({"next_creates": {"gone": True}}, CREATE, 410),
    # the create took effect, but its answer was lost
    "create-answer-lost": (
        {"http": [{"status": 503, "count": 1, "after_effect": True, "endpoint": CREATE}]},
        CREATE,
        503,
    ),
}


# The main run keeps one fault of each kind (a server error, a lost answer); the rest run
# with the slowest tests (README: Tests).
MAIN_RUN_FAULTS = {"503-search", "create-answer-lost"}


@pytest.mark.parametrize(
    "jobs", [1, pytest.param(3, marks=pytest.mark.slow)], ids=["jobs1", "jobs3"]
)
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(name, marks=() if name in MAIN_RUN_FAULTS else pytest.mark.slow)
        for name in FAULTS
    ],
    ids=FAULTS.keys(),
)
def test_one_transient_fault_costs_a_retry_not_the_run(
    fakevast: FakeVast, tmp_path: Path, fault: str, jobs: int
) -> None:
    """One failed search or create: the run completes with the right outputs, and every
    instance the fake created is destroyed (for a lost create answer: the instance created
    under it as well, whether the run used it or not)."""
    document, endpoint, status = FAULTS[fault]
    workdir = write_workflow(tmp_path / "wf", fan_out(3))
    fakevast.set_faults(document)

    run = run_snakemake(workdir, fakevast, jobs=jobs, timeout=RUN_TIMEOUT)

    assert run.ok, run.output
    assert_outputs(workdir, 3)
    answered = [call["status"] for _, call in requests_to(fakevast, endpoint)]
    assert status in answered, f"the fault never fired: {endpoint} answered {answered}"
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow
def test_search_failing_for_good_fails_the_job_naming_the_cause(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Search answers 503 forever: retries run out, the job fails with a message that says
    503, snakemake exits non-zero (through the subprocess timeout if it never gives up), and
    nothing was rented."""
    workdir = write_workflow(tmp_path / "wf", fan_out(3))
    fakevast.set_faults({"http": [{"status": 503, "count": None, "endpoint": SEARCH}]})

    run = run_snakemake(workdir, fakevast, jobs=1, timeout=RUN_TIMEOUT)

    assert run.returncode != 0, run.output
    errors = job_errors(run.output)
    assert errors, run.output
    assert any("503" in error for error in errors), errors
    assert_nothing_rented(fakevast)


# -- caps: total price and budget ---------------------------------------------------------

MAX_TOTAL_PRICE = 1.25  # three $0.40/h instances fit ($1.20/h), four do not ($1.60/h)


@pytest.mark.slow
def test_max_total_price_holds_at_every_rent(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """Eight jobs wanting eight instances at once (--jobs 8, no packing) under a total cap
    that fits three: the run completes, and at no create did the instances alive then (the
    new one included) cost more than the cap, by the fake's own ledger."""
    fake = fakevast_factory(boot_seconds=1, offers=FLAT_OFFERS)
    workdir = write_workflow(tmp_path / "wf", fan_out(8, sleep=3))
    options = ("--vastai-max-total-price", str(MAX_TOTAL_PRICE), "--vastai-no-pack")

    run = run_snakemake(workdir, fake, *options, jobs=8, timeout=RUN_TIMEOUT)

    assert run.ok, run.output
    assert_outputs(workdir, 8)
    instances = assert_all_destroyed(fake, workdir)
    totals = price_at_each_create(instances)
    assert max(totals) <= MAX_TOTAL_PRICE + 1e-9, list(zip(instances, totals, strict=True))


BUDGET = 0.15  # one $0.40/h instance: 15 min = $0.10 fits; two ($0.20 per 15 min) do not


@pytest.mark.slow
def test_budget_for_one_instance_runs_every_job_on_it(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """A budget that fits one instance (spend + 15 min at the running rate), three jobs at
    --jobs 3 without packing: the jobs wait for the run's own instance and reuse it, all
    three complete, and never is more than one instance alive."""
    fake = fakevast_factory(boot_seconds=1, offers=FLAT_OFFERS)
    workdir = write_workflow(tmp_path / "wf", fan_out(3, sleep=1))

    run = run_snakemake(
        workdir,
        fake,
        "--vastai-budget",
        str(BUDGET),
        "--vastai-no-pack",
        jobs=3,
        timeout=RUN_TIMEOUT,
    )

    assert run.ok, run.output
    assert_outputs(workdir, 3)
    instances = assert_all_destroyed(fake, workdir)
    assert most_at_once(instances) <= 1, instances


# -- orphans of a killed run go before anything new is rented -----------------------------

NAP = f"""\
localrules: all


rule all:
    input: "nap.txt"


rule nap:
    output: "nap.txt"
    shell: "{ANNOUNCE_START}; sleep {{config[nap]}}; touch {{output}}"
"""


@pytest.mark.slow
def test_rerun_destroys_the_killed_runs_instances_before_renting(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """kill -9 mid-job leaves the instance billing; after ``snakemake --unlock``, the rerun
    destroys it before its own first create request, completes, and leaves nothing."""
    workdir = write_workflow(tmp_path / "wf", NAP)
    with running_snakemake(workdir, fakevast, "--config", "nap=60", jobs=1) as process:
        orphan = wait_until_running(fakevast, workdir, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert [row["id"] for row in fakevast.alive_instances()] == [orphan]
    after_kill = len(fakevast.requests())

    unlock = run_snakemake(workdir, fakevast, "--unlock", jobs=1, timeout=RUN_TIMEOUT)
    assert unlock.ok, unlock.output
    before_rerun = len(fakevast.requests())
    rerun = run_snakemake(
        workdir, fakevast, "--config", "nap=0", "--rerun-incomplete", jobs=1, timeout=RUN_TIMEOUT
    )

    assert rerun.ok, rerun.output
    assert (workdir / "nap.txt").exists()
    destroys = [
        n
        for n, call in requests_to(fakevast, DESTROY, after_kill)
        if path_id(call["path"]) == orphan
    ]
    creates = [n for n, _ in requests_to(fakevast, CREATE, before_rerun)]
    assert destroys, f"instance {orphan} of the killed run was never destroyed"
    assert creates, "the rerun rented nothing"
    assert destroys[0] < creates[0], (
        f"the rerun's first create (request #{creates[0]}) came before the destroy of the "
        f"killed run's instance {orphan} (request #{destroys[0]})"
    )
    instances = assert_all_destroyed(fakevast, workdir)
    assert len(instances) == 2


# -- stopping a run with eight busy instances ---------------------------------------------

BUSY_8 = f"""\
localrules: all


rule all:
    input: expand("out/{{i}}.txt", i=range(8))


rule nap:
    output: "out/{{i}}.txt"
    shell: "{ANNOUNCE_START}; sleep {NAP_SECONDS}; touch {{output}}"
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_destroys_eight_busy_instances_at_once(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path, stop: signal.Signals
) -> None:
    """Eight jobs running on eight instances: after Ctrl-C or SIGTERM each of the eight is
    destroyed at the fake long before its job could end (by the fake's timestamps; SIGTERM
    must not wait for the running jobs), the process exits non-zero, and nothing is left."""
    fake = fakevast_factory(boot_seconds=0, offers=FLAT_OFFERS)
    workdir = write_workflow(tmp_path / "wf", BUSY_8)

    with running_snakemake(workdir, fake, "--vastai-no-pack", jobs=8) as process:
        wait_started(fake, workdir, process, 8, timeout=240)
        busy = sorted(row["id"] for row in fake.alive_instances() if row["status"] == "running")
        assert len(busy) == 8, fake.ledger()["instances"]
        signalled = time.time()  # the fake's timestamps are wall-clock times on this machine
        process.send_signal(stop)
        returncode = process.wait(timeout=240)
    output = (workdir / "snakemake.out").read_text()

    # When the fake ended each one (a batch destroy or one each: either way, by its ledger).
    ended = {row["id"]: row["ended_at"] for row in rented(fake)}
    late = {}
    for instance in busy:
        when = ended.get(instance)
        if when is None or when - signalled > SIGNAL_WINDOW:
            late[instance] = None if when is None else round(when - signalled, 1)
    assert not late, f"destroyed later than {SIGNAL_WINDOW} s (None: never): {late}"
    assert returncode != 0, output
    assert not any((workdir / f"out/{i}.txt").exists() for i in range(8))
    instances = assert_all_destroyed(fake, workdir)
    assert sorted(row["id"] for row in instances) == busy


# -- a user's cancel is a cancel, not a failed job ----------------------------------------

TWO_NAPS = f"""\
localrules: all


rule all:
    input: expand("out/{{i}}.txt", i=range(2))


rule nap:
    output: "out/{{i}}.txt"
    shell: "{ANNOUNCE_START}; sleep 60; touch {{output}}"
"""


def test_ctrl_c_is_reported_as_cancelled(fakevast: FakeVast, tmp_path: Path) -> None:
    """Ctrl-C with two jobs running: the plugin says they were cancelled, Snakemake does
    not report them as failed jobs ("Error in rule nap"), no line of the plugin's internal
    shell scripts reaches the output, and nothing is left."""
    workdir = write_workflow(tmp_path / "wf", TWO_NAPS)

    with running_snakemake(workdir, fakevast, jobs=2) as process:
        wait_started(fakevast, workdir, process, 2, timeout=120)
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=120)
    output = (workdir / "snakemake.out").read_text()

    assert returncode != 0, output
    assert "Error in rule nap" not in output, output
    cancelled = [line for line in output.splitlines() if "Cancelled 2 job(s)" in line]
    assert len(cancelled) == 1 and cancelled[0].count("rule nap (jobid") == 2, output
    assert "All 1 instance(s) of this run are destroyed; none is billing." in output, output
    leaked = [line for line in output.splitlines() if any(text in line for text in SCRIPT_TEXT)]
    assert leaked == [], leaked
    assert_all_destroyed(fakevast, workdir)
