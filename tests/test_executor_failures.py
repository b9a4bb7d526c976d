"""Real Snakemake with ``--executor vastai`` against the fake marketplace, when things go wrong:
boots that fail or hang, hosts that vanish, jobs that fail, overrun or forget an output, and
input that must be refused before anything is rented.

Every test checks the three things a user sees: Snakemake's exit code, the message it prints,
and (through the fixtures and the fake's ledger) that nothing is left billing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.pool.placement import BOOT_ATTEMPTS
from snakemake_executor_plugin_vastai.remote.bootstrap import NO_SSHD_FIX, NO_SSHD_MARKER
from tests.fakevast.faults import BOOT_FAILURES
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    ANNOUNCE_START,
    assert_all_destroyed,
    assert_nothing_rented,
    fatal_error,
    job_errors,
    one_rule_workflow,
    proxy_down_fake,
    run_snakemake,
    run_summary,
    running_snakemake,
    wait_until_running,
    write_workflow,
)

ATTEMPT = "attempt=lambda wildcards, attempt: attempt"
# A lost host must be given up within one instance-list interval (30 s) plus a margin.
LOST_HOST_NOTICED_S = 45


def only_job_error(output: str) -> str:
    """The message of the one failed job (the tests below have exactly one)."""
    errors = job_errors(output)
    assert len(errors) == 1, output
    return errors[0]


def assert_failed(run_output: str, returncode: int) -> None:
    assert returncode != 0, run_output
    assert "At least one job did not complete successfully" in fatal_error(run_output), run_output


# -- boot ------------------------------------------------------------------------------------


IMAGE_FAULTS = {"manifest", "unauthorized"}  # every machine would fail them


@pytest.mark.parametrize(
    "status_msg", BOOT_FAILURES, ids=["oci", "toomanyrequests", "manifest", "unauthorized", "disk"]
)
def test_fatal_boot_error_fails_fast(
    fakevast: FakeVast, tmp_path: Path, status_msg: str, request: pytest.FixtureRequest
) -> None:
    """A Docker error that waiting cannot heal ends that boot at once (not after the 120 s
    boot timeout), quoting the error, and the broken instance is destroyed. A bad image fails
    the job then and there; a machine's error sends the job to another machine, and the
    job fails only when BOOT_ATTEMPTS machines in turn did not boot."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    fakevast.set_faults({"next_creates": {"count": None, "boot_failure": status_msg}})

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert_failed(run.output, run.returncode)
    message = only_job_error(run.output)
    assert status_msg in message and "boot timeout" not in message, message
    assert f"Last lines of the instance's log:\n    {status_msg}" in message, message
    instances = assert_all_destroyed(fakevast, workdir)
    if request.node.callspec.id in IMAGE_FAULTS:
        assert len(instances) == 1, instances
    else:
        assert len(instances) == BOOT_ATTEMPTS, instances
        assert len({i["machine_id"] for i in instances}) == BOOT_ATTEMPTS, instances
        assert f"{BOOT_ATTEMPTS} instances failed to boot, each on another" in message, message
    assert not (workdir / "out.txt").exists()


def test_a_job_whose_instance_did_not_boot_runs_on_another_machine(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """The first instance fails to boot: the job rents again by itself (no --retries), its
    machine is left out of every later search of the run (the offer query says so), and the
    cost summary names the excluded machine and why."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    fakevast.set_faults({"next_creates": {"count": 1, "boot_failure": BOOT_FAILURES[0]}})

    run = run_snakemake(workdir, fakevast, "--verbose", jobs=1)

    assert run.ok, run.output
    failed, retried = assert_all_destroyed(fakevast, workdir)
    assert failed["machine_id"] != retried["machine_id"]
    assert f"machine_id notin [{failed['machine_id']}]" in run.output
    assert f"instance {failed['id']} did not boot; renting another for" in run.output
    excluded = run_summary(workdir)["excluded_hosts"]
    assert list(excluded) == [str(failed["machine_id"])]
    assert "did not boot" in excluded[str(failed["machine_id"])]


REBOOT = "PUT /api/v0/instances/reboot/{id}/"


@pytest.mark.slow
def test_an_image_without_sshd_fails_with_its_log_and_the_fix(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Vast reports such an instance running, but no login ever works: the job's error quotes
    the instance's log (where the onstart script said what is missing) and names the fix,
    without a reboot that could not help."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    run = run_snakemake(
        workdir, fakevast, "--vastai-image", "nossh/alpine:3.20", "--vastai-boot-timeout", "20",
        jobs=1,
    )  # fmt: skip

    assert_failed(run.output, run.returncode)
    message = only_job_error(run.output)
    assert NO_SSHD_FIX in message, message
    assert "Last lines of the instance's log" in message and NO_SSHD_MARKER in message, message
    assert fakevast.ledger()["api_calls"].get(REBOOT, 0) == 0
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow
def test_a_proxy_tunnel_that_never_comes_up_gets_one_reboot(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    fake = proxy_down_fake(fakevast_factory, tmp_path)
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    run = run_snakemake(workdir, fake, "--vastai-boot-timeout", "15", jobs=1)

    assert run.ok, run.output
    assert "rebooting it once" in run.output
    assert fake.ledger()["api_calls"][REBOOT] == 1
    assert len(assert_all_destroyed(fake, workdir)) == 1


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_stuck_boot_hits_the_boot_timeout(fakevast: FakeVast, tmp_path: Path) -> None:
    """An image pull that never ends is given up at --vastai-boot-timeout, and the message
    says which option to raise."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    fakevast.set_faults({"next_creates": {"count": None, "stuck_loading": True}})

    run = run_snakemake(workdir, fakevast, "--vastai-boot-timeout", "5", jobs=1)

    assert_failed(run.output, run.returncode)
    message = only_job_error(run.output)
    assert "boot timeout" in message and "--vastai-boot-timeout" in message, message
    assert "Last lines of the instance's log:\n    Pulling image" in message, message
    assert_all_destroyed(fakevast, workdir)


# -- during the job --------------------------------------------------------------------------

# Attempt 1 sleeps long enough to be caught mid-job; a retry (attempt 2) finishes at once.
SLEEPY_FIRST_ATTEMPT = (
    f"{ANNOUNCE_START}; if [ {{resources.attempt}} -eq 1 ]; then sleep 90; fi; echo ok > {{output}}"
)


@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 1], ids=["no-retry", "retried"])
def test_host_goes_offline_mid_job(fakevast: FakeVast, tmp_path: Path, retries: int) -> None:
    """The host dies under a running job: the job fails (and with --retries succeeds on a
    new instance); the dead instance is destroyed either way."""
    workdir = one_rule_workflow(tmp_path / "wf", SLEEPY_FIRST_ATTEMPT, resources=ATTEMPT)

    with running_snakemake(workdir, fakevast, "--retries", str(retries), jobs=1) as process:
        lost = wait_until_running(fakevast, workdir, process)
        fakevast.set_faults({"instances": {str(lost): {"offline": True}}})
        went_offline = time.time()  # the fake's ledger times are wall-clock times too
        returncode = process.wait(timeout=200)
    output = (workdir / "snakemake.out").read_text()

    instances = assert_all_destroyed(fakevast, workdir)
    assert instances[0]["id"] == lost
    # The instance list (polled every 30 s while jobs run) tells the plugin the host is gone;
    # SSH reconnects must not keep it waiting long after that.
    noticed = instances[0]["ended_at"] - went_offline
    assert noticed < LOST_HOST_NOTICED_S, f"a lost host went unnoticed for {noticed:.0f} s"
    first_error = job_errors(output)[0]  # from the instance list, or from SSH giving up
    assert str(lost) in first_error, first_error
    assert "offline" in first_error or "unreachable" in first_error, first_error
    if retries:
        assert returncode == 0, output
        assert len(instances) == 2 and instances[1]["id"] != lost
        assert (workdir / "out.txt").read_text() == "ok\n"
    else:
        assert_failed(output, returncode)
        assert len(instances) == 1


@pytest.mark.slow
def test_failed_job_is_retried_on_a_new_instance(fakevast: FakeVast, tmp_path: Path) -> None:
    """--retries works as with any executor (attempt 2 sees attempt=2), and the retry does
    not run on the instance its failed attempt used."""
    workdir = one_rule_workflow(
        tmp_path / "wf", "test {resources.attempt} -ge 2 && echo ok > {output}", resources=ATTEMPT
    )

    run = run_snakemake(workdir, fakevast, "--retries", "1", jobs=1)

    assert run.ok, run.output
    assert len(job_errors(run.output)) == 1  # attempt 1 failed and was reported
    assert (workdir / "out.txt").read_text() == "ok\n"
    instances = assert_all_destroyed(fakevast, workdir)
    assert len({i["id"] for i in instances}) == len(instances) == 2


def test_max_runtime_kills_the_job(fakevast: FakeVast, tmp_path: Path) -> None:
    """--vastai-max-runtime caps what a runaway job can cost."""
    workdir = one_rule_workflow(tmp_path / "wf", "sleep 60; echo hi > {output}")

    run = run_snakemake(workdir, fakevast, "--vastai-max-runtime", "3", jobs=1)

    assert_failed(run.output, run.returncode)
    assert "--vastai-max-runtime" in only_job_error(run.output)
    assert not (workdir / "out.txt").exists()
    assert_all_destroyed(fakevast, workdir)


def test_missing_output_is_named(fakevast: FakeVast, tmp_path: Path) -> None:
    """A job that exits 0 without its declared output fails, and the user is told which file."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > other.txt")

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert_failed(run.output, run.returncode)
    assert "out.txt" in only_job_error(run.output)
    assert not (workdir / "out.txt").exists()
    assert_all_destroyed(fakevast, workdir)


# -- refused before renting ------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    """A run that must stop with ``fragments`` in its message and nothing rented."""

    resources: str = "gpu=1"
    options: tuple[str, ...] = ()
    env: dict[str, str | None] = field(default_factory=dict)
    fragments: tuple[str, ...] = ()
    per_job: bool = True  # the message is the job's (else: the whole run's, at start)
    secret: str | None = None  # must not appear anywhere in the output


NO_KEY = {"VAST_API_KEY": None, "SNAKEMAKE_VASTAI_API_KEY": None, "XDG_CONFIG_HOME": None}
BAD_INPUTS = {
    "gpu=-1": BadInput(
        resources="gpu=-1",
        fragments=("Rule 'make'", "gpu=-1", "0 or more"),
    ),
    "unknown region": BadInput(
        options=("--vastai-geolocation", "Atlantis"),
        fragments=("--vastai-geolocation", "'Atlantis'", "region"),
        per_job=False,
    ),
    "unparsable vastai_query": BadInput(
        resources="gpu=1, vastai_query='cuda_vers>>=12 ]['",
        fragments=("Rule 'make'", "vastai_query", "rejects"),
    ),
    "misspelt field in --vastai-search-query": BadInput(
        options=("--vastai-search-query", "inet_dwn>=100"),
        fragments=("--vastai-search-query", "unknown offer field(s) inet_dwn"),
        per_job=False,
    ),
    "missing API key": BadInput(
        env=NO_KEY,
        fragments=("No Vast.ai API key found", "VAST_API_KEY", "Nothing was rented"),
        per_job=False,
    ),
    "wrong API key": BadInput(
        env={"VAST_API_KEY": "not-the-fake-key"},
        fragments=("rejected the API key",),
        per_job=False,
        secret="not-the-fake-key",
    ),
    "no such GPU": BadInput(
        resources="gpu=1, gpu_model='H200'",
        fragments=(
            "No H200 offer",
            "for rule make.",
            "No offer lists a GPU named H200",
            "Without resource `gpu_model` (now H200)",
            "Nothing was rented.",
        ),
        per_job=False,
    ),
    "price cap too low": BadInput(
        options=("--vastai-max-price", "0.001"),
        fragments=(
            "No offer under $0.001/h",
            "for rule make.",
            "With `--vastai-max-price 0.61` (now 0.001)",
            "Nothing was rented.",
        ),
        per_job=False,
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_refused_before_renting(fakevast: FakeVast, tmp_path: Path, case: BadInput) -> None:
    """Mistakes the plugin can see before renting cost nothing, and the message says what to
    change."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}", resources=case.resources)
    home = tmp_path / "home"  # no ~/.vast_api_key or ~/.config/vastai to fall back on
    home.mkdir()

    run = run_snakemake(
        workdir, fakevast, *case.options, jobs=1, env={"HOME": str(home)} | case.env
    )

    assert run.returncode != 0, run.output
    message = only_job_error(run.output) if case.per_job else fatal_error(run.output)
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if case.secret:
        assert case.secret not in run.output
    assert_nothing_rented(fakevast)


RUNNER_KILLER = """\
rule all:
    input: "c.txt"

rule a:
    output: "a.txt"
    shell: "kill -9 $(cat ~/snakemake-vastai/runner-*.pid); echo a > {output}"

rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "cat {input} > {output}; echo b >> {output}"

rule c:
    input: "b.txt"
    output: "c.txt"
    shell: "cat {input} > {output}; echo c >> {output}"
"""


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_a_runner_killed_mid_run_costs_no_job(fakevast: FakeVast, tmp_path: Path) -> None:
    """The first job kills its instance's resident runner: it still finishes (it was forked
    into its own session), and the next jobs run as plain processes, or through the runner the
    next job started again; either way the chain completes on its one warm instance."""
    workdir = write_workflow(tmp_path / "wf", RUNNER_KILLER)

    run = run_snakemake(workdir, fakevast, "--vastai-pool-ttl", "60", jobs=1)

    assert run.ok, run.output
    assert (workdir / "c.txt").read_text() == "a\nb\nc\n"
    assert "runs as a plain process: the runner is not running" in run.output
    assert len(assert_all_destroyed(fakevast, workdir)) == 1
