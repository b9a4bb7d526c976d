"""The check before the first rent: a rule that no offer can serve stops the run before
anything is rented, with the diagnosis; a run whose rules all have offers rents as usual; a
marketplace that cannot be searched during the check does not stop the run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.edge.preflight import (
    KnownResources,
    Unrentable,
    planned_requests,
    preflight,
)
from snakemake_executor_plugin_vastai.edge.resources import request_of
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.market.hosts import ExcludedHosts
from snakemake_executor_plugin_vastai.market.marketplace import Marketplace
from snakemake_executor_plugin_vastai.pool.caps import Caps
from snakemake_executor_plugin_vastai.pool.ledger import Ledger
from snakemake_executor_plugin_vastai.pool.renter import OfferSearch, Renter, RentPlan
from snakemake_executor_plugin_vastai.pool.table import InstanceTable
from tests.fakevast.harness import FakeVast
from tests.test_resources import FakeJob
from tests.workflows import (
    assert_all_destroyed,
    assert_nothing_rented,
    fatal_error,
    run_snakemake,
    running_snakemake,
    write_workflow,
)

TWO_RULES = """\
rule all:
    input: "ok.txt", "other.txt"

rule ok:
    output: "ok.txt"
    resources: gpu=1
    shell: "echo ok > {{output}}"

rule other:
    input: {other_input}
    output: "other.txt"
    resources: {resources}
    shell: "echo other > {{output}}"
"""


def two_rules(target: Path, resources: str, after_ok: bool = False) -> Path:
    """Rule ``ok`` (any GPU) and rule ``other`` with ``resources``, downstream of ``ok``
    if ``after_ok`` (its input does not exist when the run starts)."""
    other_input = '"ok.txt"' if after_ok else "[]"
    return write_workflow(target, TWO_RULES.format(resources=resources, other_input=other_input))


def assert_torn_down(workdir: Path) -> None:
    """The run's teardown ran: it deletes the run's SSH key."""
    keys = workdir / ".snakemake" / "vastai" / "keys"
    assert not keys.exists() or list(keys.iterdir()) == []


@dataclass(frozen=True)
class Impossible:
    resources: str
    after_ok: bool = False
    options: tuple[str, ...] = ()
    message: str = ""  # the diagnosis, exactly


IMPOSSIBLE = {
    "mem_mb too large": Impossible(
        "gpu=1, mem_mb=900000",
        message="No offer with >= 900 GB RAM at reliability >= 0.98 (the default) from "
        "datacenters only (the default) for rule other. With resource `mem_mb=416000` (now "
        "900 GB): 1 offer from $3.74/h.",
    ),
    "misspelt gpu_model, downstream": Impossible(
        "gpu=1, gpu_model='RTX4090'",
        after_ok=True,
        message="No RTX4090 offer at reliability >= 0.98 (the default) from datacenters only "
        "(the default) for rule other. No offer lists a GPU named RTX4090; did you mean "
        "RTX_4090? With resource `gpu_model='RTX_4090'`: 3 offers from $1.02/h.",
    ),
    "the defaults the user never set": Impossible(
        "gpu=1",
        options=("--vastai-gpu-name", "RTX_3090"),
        message="No RTX_3090 offer at reliability >= 0.98 (the default) from datacenters only "
        "(the default) for rules ok, other. With `--vastai-no-datacenter` (now datacenters "
        "only, the default): 1 offer from $0.19/h. With `--vastai-reliability 0.97` (now "
        "0.98, the default): 2 offers from $0.22/h.",
    ),
}


@pytest.mark.parametrize("case", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_a_rule_without_offers_stops_the_run_before_any_rent(
    fakevast: FakeVast, tmp_path: Path, case: Impossible
) -> None:
    workdir = two_rules(tmp_path / "wf", case.resources, case.after_ok)

    run = run_snakemake(workdir, fakevast, *case.options)

    assert run.returncode != 0, run.output
    assert fatal_error(run.output) == f"{case.message}\nNothing was rented."
    assert run.output.count(case.message) == 1, run.output  # said once
    assert_nothing_rented(fakevast)
    requests = fakevast.requests()
    assert not [r for r in requests if r["endpoint"] == "PUT /api/v0/asks/{id}/"], requests
    assert_torn_down(workdir)
    assert not (workdir / "ok.txt").exists()


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_a_run_whose_rules_all_have_offers_rents_as_usual(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = two_rules(tmp_path / "wf", "gpu=1, gpu_model='RTX_4090'", after_ok=True)

    run = run_snakemake(workdir, fakevast, "--vastai-pool-ttl", "0")

    assert run.ok, run.output
    assert (workdir / "other.txt").read_text() == "other\n"
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow
def test_a_search_failing_during_the_check_does_not_stop_the_run(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Every search fails (503) until the check has given up; the rents then search
    afresh and the run completes. The check is advice, never a reason to stop."""
    workdir = two_rules(tmp_path / "wf", "gpu=1")
    fakevast.set_faults(
        {"http": [{"status": 503, "count": None, "endpoint": "POST /api/v0/bundles/"}]}
    )
    gave_up = "Could not check the offers before renting"
    output = workdir / "snakemake.out"

    with running_snakemake(workdir, fakevast, "--vastai-pool-ttl", "0") as process:
        fakevast.wait_for(lambda: gave_up in output.read_text(), timeout=300, interval=0.2)
        fakevast.clear_faults()
        assert process.wait(timeout=600) == 0, output.read_text()

    assert (workdir / "other.txt").read_text() == "other\n"
    assert_all_destroyed(fakevast, workdir)


# -- the check itself, without Snakemake -------------------------------------------------


def make_renter(fake: FakeVast, state_dir: Path) -> Renter:
    """A run's renter whose shared search keeps its answers for the whole test."""
    market = Marketplace(fake.api_key, fake.url)
    return Renter(
        market,
        Ledger(state_dir),
        InstanceTable(),
        OfferSearch(market, "dph_total", ttl=3600),
        RentPlan("test", Caps(), exclusive=False, onstart=""),
        spend=lambda: 0.0,
        excluded=ExcludedHosts(),
    )


def job(name: str, resources: dict[str, Any], threads: int = 1) -> FakeJob:
    return FakeJob(resources, threads, name=name, rules=[name])


def searches(fake: FakeVast) -> int:
    return fake.ledger()["api_calls"].get("POST /api/v0/bundles/", 0)


def test_one_search_per_distinct_query_which_the_first_rents_reuse(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Queries that differ only in their GPU model (any, an RTX 4090) share one search."""
    renter = make_renter(fakevast, tmp_path)
    settings = ExecutorSettings()
    jobs = [
        job("a", {"gpu": 1}),
        job("a", {"gpu": 1}),
        job("b", {"gpu": 1}),  # the same search as rule a
        job("c", {"gpu": 1, "gpu_model": "RTX_4090"}),  # a's search, with a model
        job("d", {"gpu": 2}),  # a search of its own
    ]

    preflight(planned_requests(jobs, settings).values(), renter, settings)

    assert searches(fakevast) == 2
    for fake_job in jobs:
        request = request_of(fake_job, settings)
        assert renter.candidates(request), request.offer_query()
    assert searches(fakevast) == 2


def test_every_rule_without_offers_is_named(fakevast: FakeVast, tmp_path: Path) -> None:
    renter = make_renter(fakevast, tmp_path)
    jobs = [
        job("fine", {"gpu": 1}),
        job("huge", {"gpu": 1, "mem_mb": 900_000}),
        job("many", {"gpu": 16}),
        job("also_many", {"gpu": 16}),
    ]

    with pytest.raises(Unrentable) as raised:
        settings = ExecutorSettings()
        preflight(planned_requests(jobs, settings).values(), renter, settings)

    lines = str(raised.value).splitlines()
    assert [line.split(" for ")[1].split(".")[0] for line in lines[:-1]] == [
        "rule huge",
        "rules also_many, many",
    ]
    assert lines[-1] == "Nothing was rented."


def test_resources_not_known_yet_are_left_out_of_the_check() -> None:
    """A downstream job's default mem_mb depends on its input: Snakemake says <TBD> until
    it exists. The job is checked on everything else."""
    downstream = FakeJob(
        {"gpu": 1, "gpu_model": "H200", "mem_mb": "<TBD>", "mem": "<TBD>", "tmpdir": "<TBD>"}
    )
    known = KnownResources(downstream)

    request = request_of(known, ExecutorSettings())

    assert request.gpu_name == "H200"
    assert request.mem_gb is None
    assert known.unknown == ("mem_mb",)
