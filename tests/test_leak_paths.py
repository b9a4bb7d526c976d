"""The paths a review of the pool traced to money left billing or a run left hanging, each
reached in a real run where one can reach it: a create that would start after teardown
began, a create still in flight at teardown, a second signal during a teardown, an offer too
small for the job it was searched for, the total-price cap with an idle instance of another
kind. Every test ends with the fake showing nothing alive (the fixtures check it)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.test_pool_faults import (
    BUSY_8,
    CREATE,
    FLAT_OFFERS,
    price_at_each_create,
    requests_to,
    wait_started,
)
from tests.test_pool_workflows import most_at_once
from tests.workflows import (
    assert_all_destroyed,
    one_rule_workflow,
    rented,
    run_snakemake,
    running_snakemake,
    write_workflow,
)

RUN_TIMEOUT = 300


def wait_for_output(workdir: Path, text: str, timeout: float = 120) -> None:
    out = workdir / "snakemake.out"
    deadline = time.monotonic() + timeout
    while text not in out.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never came:\n{out.read_text()}")
        time.sleep(0.1)


# -- no create starts once teardown has begun -----------------------------------------------


def test_a_create_retrying_rate_limits_stops_at_ctrl_c(fakevast: FakeVast, tmp_path: Path) -> None:
    """Vast.ai answers every create with 429: the plugin retries. Ctrl-C comes, and then the
    marketplace would accept: no create may go through after the teardown began."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    fakevast.set_faults({"http": [{"status": 429, "count": None, "endpoint": CREATE}]})

    with running_snakemake(workdir, fakevast, jobs=1) as process:
        fakevast.wait_for(lambda: requests_to(fakevast, CREATE), timeout=120, interval=0.1)
        process.send_signal(signal.SIGINT)
        wait_for_output(workdir, "Terminating processes on user request")
        fakevast.clear_faults()  # the next create retry would now succeed
        returncode = process.wait(timeout=120)

    assert returncode != 0
    assert rented(fakevast) == [], "an instance was created after the teardown began"


@pytest.mark.slow
def test_a_create_in_flight_at_ctrl_c_is_destroyed_when_it_lands(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """The create request is on its way (the marketplace takes 8 s to answer) when Ctrl-C
    comes: the teardown waits for the answer and destroys what it made."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    fakevast.set_faults({"http": [{"latency": 8, "count": 1, "endpoint": CREATE}]})

    with running_snakemake(workdir, fakevast, jobs=1) as process:
        fakevast.wait_for(lambda: requests_to(fakevast, CREATE), timeout=120, interval=0.1)
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=120)
    output = (workdir / "snakemake.out").read_text()

    assert returncode != 0
    assert "All 1 instance(s) of this run are destroyed; none is billing." in output, output
    assert_all_destroyed(fakevast, workdir)


# -- a second signal never interrupts the teardown -----------------------------------------


@pytest.mark.slow
def test_sighup_after_ctrl_c_does_not_cut_the_teardown_short(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """Eight busy instances, Ctrl-C, and while their destroys are under way (each takes 3 s
    to answer) the terminal closes (SIGHUP): the teardown goes on to its end, says so, and
    reports every instance gone."""
    fake = fakevast_factory(boot_seconds=0, offers=FLAT_OFFERS)
    workdir = write_workflow(tmp_path / "wf", BUSY_8)

    with running_snakemake(workdir, fake, "--vastai-no-pack", jobs=8) as process:
        wait_started(fake, workdir, process, 8, timeout=240)
        slow_destroys = {"latency": 3, "count": None, "endpoint": "DELETE /api/v0/instances/{id}/"}
        fake.set_faults({"http": [slow_destroys]})
        process.send_signal(signal.SIGINT)
        wait_for_output(workdir, "Destroying instance")
        process.send_signal(signal.SIGHUP)
        returncode = process.wait(timeout=240)
    output = (workdir / "snakemake.out").read_text()

    assert returncode != 0, output
    assert "SIGHUP: still destroying this run's Vast.ai instances" in output, output
    assert "All 8 instance(s) of this run are destroyed; none is billing." in output, output
    assert "Vast.ai cost of run" in output, output
    fake.clear_faults()
    assert len(assert_all_destroyed(fake, workdir)) == 8


# -- an offer that could never hold the job ------------------------------------------------


def test_an_offer_too_small_for_the_job_is_passed_over(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """The cheapest offer matching the query has half a core (a share of a machine): a
    one-thread job cannot run there, so it is not rented; the next offer is."""
    offers = json.loads(FLAT_OFFERS.read_text())
    offers[0] = offers[0] | {"cpu_cores_effective": 0.5, "dph_base": 0.1}
    catalogue = tmp_path / "offers.json"
    catalogue.write_text(json.dumps(offers))
    fake = fakevast_factory(boot_seconds=0, offers=catalogue)
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    run = run_snakemake(workdir, fake, jobs=1, timeout=RUN_TIMEOUT)

    assert run.ok, run.output
    [instance] = assert_all_destroyed(fake, workdir)
    assert instance["offer_id"] != offers[0]["id"], instance


# -- the total-price cap evicts idle instances of another kind -----------------------------

# a1 and a2 are one kind, b another (its own extra query); one $0.40/h instance fits the cap,
# two do not. When b comes, a1's instance is idle and still wanted (a2 is to come).
PRICE_CAP = 0.5
A_B_A = """\
localrules: all


rule all:
    input: "a2.txt"


rule a1:
    output: "a1.txt"
    resources: gpu=1
    shell: "echo a1 > {output}"


rule b:
    input: "a1.txt"
    output: "b.txt"
    resources: gpu=1, vastai_query="cpu_cores_effective>=2"
    shell: "cat {input} > {output}; echo b >> {output}"


rule a2:
    input: "b.txt"
    output: "a2.txt"
    resources: gpu=1
    shell: "cat {input} > {output}; echo a2 >> {output}"
"""


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_the_total_price_cap_evicts_an_idle_instance_of_another_kind(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    fake = fakevast_factory(boot_seconds=0, offers=FLAT_OFFERS)
    workdir = write_workflow(tmp_path / "wf", A_B_A)

    run = run_snakemake(
        workdir,
        fake,
        "--vastai-max-total-price",
        str(PRICE_CAP),
        "--vastai-pool-max-instances",
        "4",
        jobs=1,
        timeout=RUN_TIMEOUT,
    )

    assert run.ok, run.output
    assert (workdir / "a2.txt").read_text() == "a1\nb\na2\n"
    assert "the run's price cap needs room for a job" in run.output, run.output
    instances = assert_all_destroyed(fake, workdir)
    assert most_at_once(instances) == 1, instances
    assert max(price_at_each_create(instances)) <= PRICE_CAP, instances
