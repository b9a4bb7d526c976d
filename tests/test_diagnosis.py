"""The near-miss diagnosis: when no offer matches, which single change finds one, worded
for the user. Searches go to a running fake over the real SDK, so the counts and prices
below are those of the catalogue (tests/fakevast/offers.json), checked by hand."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.edge.resources import request_of
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.market.diagnosis import (
    RELAXED_LIMIT,
    diagnose,
    did_you_mean,
    market_search,
)
from snakemake_executor_plugin_vastai.market.hosts import ExcludedHosts
from snakemake_executor_plugin_vastai.market.marketplace import Marketplace, MarketplaceError, Offer
from snakemake_executor_plugin_vastai.market.request import ResourceRequest
from snakemake_executor_plugin_vastai.pool.caps import Caps
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, make_label
from snakemake_executor_plugin_vastai.pool.renter import NoOfferError, OfferSearch, Renter, RentPlan
from snakemake_executor_plugin_vastai.pool.table import InstanceTable
from tests.fakevast.harness import FakeVast
from tests.test_resources import FakeJob


@pytest.fixture(scope="module")
def market() -> Iterator[Marketplace]:
    """One fake for the module: searching rents nothing."""
    with FakeVast(rate_limits=False) as fake:
        yield Marketplace(fake.api_key, fake.url)
        assert fake.ledger()["instances"] == []


@dataclass(frozen=True)
class Case:
    resources: dict[str, Any]
    threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # the whole message, with the run's settings known


CASES = {
    "the default reliability blocks, in a region, under a cap": Case(
        {"gpu": 1, "gpu_model": "RTX_4090"},
        options={"geolocation": "EU", "max_price": 1.0},
        message="No RTX_4090 offer in EU under $1.00/h at reliability >= 0.98 (the default) "
        "from datacenters only (the default) for rule train. "
        "With `--vastai-reliability 0.97` (now 0.98, the default): 3 offers from $0.32/h. "
        "With `--vastai-no-datacenter` (now datacenters only, the default): 1 offer from "
        "$0.35/h.",
    ),
    "a misspelt GPU model": Case(
        {"gpu": 1, "gpu_model": "rtx4090"},
        message="No rtx4090 offer at reliability >= 0.98 (the default) from datacenters only "
        "(the default) for rule train. No offer lists a GPU named rtx4090; did you mean "
        "RTX_4090? With resource `gpu_model='RTX_4090'`: 3 offers from $1.02/h.",
    ),
    "a GPU model no offer has": Case(
        {"gpu": 1, "gpu_model": "H200"},
        message="No H200 offer at reliability >= 0.98 (the default) from datacenters only "
        "(the default) for rule train. No offer lists a GPU named H200 (models listed: "
        "A100_SXM4, H100_SXM, L40S, RTX_3060, RTX_3090, RTX_4090, RTX_A6000). Without "
        "resource `gpu_model` (now H200): 5 offers from $0.61/h (RTX_A6000, RTX_4090, "
        "H100_SXM).",
    ),
    "the GPU model from the option": Case(
        {"gpu": 1},
        options={"gpu_name": "A100_SXM4"},
        message="No A100_SXM4 offer at reliability >= 0.98 (the default) from datacenters "
        "only (the default) for rule train. With `--vastai-reliability 0.95` (now 0.98, the "
        "default): 1 offer from $7.61/h. Without `--vastai-gpu-name` (now A100_SXM4): 5 "
        "offers from $0.61/h (RTX_A6000, RTX_4090, H100_SXM).",
    ),
    "too many GPUs": Case(
        {"gpu": 16},
        message="No 16x GPU offer at reliability >= 0.98 (the default) from datacenters only "
        "(the default) for rule train. With resource `gpu=8` (now 16): 1 offer from $3.74/h.",
    ),
    "too much memory": Case(
        {"gpu": 1, "mem_mb": 900_000},
        message="No offer with >= 900 GB RAM at reliability >= 0.98 (the default) from "
        "datacenters only (the default) for rule train. With resource `mem_mb=416000` (now "
        "900 GB): 1 offer from $3.74/h.",  # its share of the machine's 512 GB
    ),
    "too many threads": Case(
        {"gpu": 1},
        threads=200,
        message="No offer with >= 200 cores at reliability >= 0.98 (the default) from "
        "datacenters only (the default) for rule train. With `threads: 104` (now 200): 1 "
        "offer from $3.74/h.",
    ),
    "too much disk (priced for the disk suggested)": Case(
        {"gpu": 1, "disk_mb": 9_000_000},
        message="No offer with >= 9000 GB disk at reliability >= 0.98 (the default) from "
        "datacenters only (the default) for rule train. With resource `disk_mb=4000000` "
        "(now 9000 GB): 1 offer from $4.29/h.",
    ),
    "a price cap below every offer": Case(
        {"gpu": 1},
        options={"max_price": 0.001},
        message="No offer under $0.001/h at reliability >= 0.98 (the default) from "
        "datacenters only (the default) for rule train. With `--vastai-max-price 0.61` "
        "(now 0.001): 1 offer from $0.61/h.",
    ),
    "an extra filter": Case(
        {"gpu": 1, "vastai_query": "cuda_vers>=13"},
        message="No offer at reliability >= 0.98 (the default) from datacenters only (the "
        "default) matching 'cuda_vers>=13' for rule train. Without resource `vastai_query` "
        "(now 'cuda_vers>=13'): 5 offers from $0.61/h.",
    ),
    "no single change is enough": Case(
        {"gpu": 1, "gpu_model": "RTX_3060"},
        options={"max_price": 0.05},
        message="No RTX_3060 offer under $0.05/h at reliability >= 0.98 (the default) from "
        "datacenters only (the default) for rule train. No single change to the request "
        "finds an offer. Query: num_gpus>=1 gpu_name=RTX_3060 disk_space>=40 "
        "reliability>=0.98 datacenter=True dph_total<=0.05",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_message(market: Marketplace, case: Case) -> None:
    settings = ExecutorSettings(**case.options)
    request = request_of(FakeJob(case.resources, case.threads), settings)
    assert market.search(request.offer_query(), "dph_total", request.disk_gb) == []

    diagnosis = diagnose(request, market_search(market), settings)

    assert diagnosis.message == case.message


def test_without_the_settings_both_sources_are_named(market: Marketplace) -> None:
    """The renter knows only the request: a value an option and a resource can both set
    names both, and defaults are still recognised as such."""
    request = request_of(
        FakeJob({"gpu": 1, "gpu_model": "H200", "vastai_query": "cuda_vers>=12"}),
        ExecutorSettings(geolocation="EU"),
    )

    message = diagnose(request, market_search(market)).message

    assert message.startswith("No H200 offer in EU at reliability >= 0.98 (the default)")
    assert "Without resource `gpu_model` (or `--vastai-gpu-name`) (now H200)" in message


class CountingSearch:
    """A Search that answers from a list of canned results and counts its calls; an
    exception in the list is raised instead."""

    def __init__(self, *answers: list[Offer] | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[ResourceRequest, int]] = []

    def __call__(self, request: ResourceRequest, limit: int) -> list[Offer]:
        self.calls.append((request, limit))
        answer = self.answers.pop(0) if self.answers else []
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_one_search_per_filter_present() -> None:
    """Only the filters the request has are relaxed, each once, plus one search for the
    GPU models when the request names one."""
    plain = request_of(FakeJob({"gpu": 1}), ExecutorSettings(reliability=0))
    search = CountingSearch()
    diagnose(plain, search)
    assert len(search.calls) == 2  # datacenter-only and disk_space>=40

    everything = request_of(
        FakeJob({"gpu": 2, "gpu_model": "L40S", "mem_mb": 8000, "vastai_query": "inet_up>=1"}, 4),
        ExecutorSettings(geolocation="EU", max_price=2.0),
    )
    search = CountingSearch()
    diagnose(everything, search)
    # GPU models + gpu_model, gpu, geolocation, reliability, datacenter, price, threads,
    # mem_mb, disk, vastai_query
    assert len(search.calls) == 11
    assert max(limit for _, limit in search.calls[1:]) == RELAXED_LIMIT


def test_a_failing_search_keeps_the_headline_and_the_query() -> None:
    request = request_of(FakeJob({"gpu": 1, "mem_mb": 900_000}), ExecutorSettings(max_price=0.5))
    failure = MarketplaceError("Vast.ai API: could not search offers: HTTP 503 ", 503)
    search = CountingSearch([], failure)

    message = diagnose(request, search).message

    assert message.startswith("No offer under $0.50/h with >= 900 GB RAM")
    assert "(Looking for a near miss failed: Vast.ai API: could not search offers: HTTP 503.)" in (
        message
    )
    assert message.endswith(f"Query: {request.offer_query()}")
    assert len(search.calls) == 2  # stopped at the failure


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("RTX4090", "RTX 4090"),
        ("rtx_4090", "RTX 4090"),
        ("RTX-A6000", "RTX A6000"),
        ("a100sxm4", "A100 SXM4"),
        ("RTX 4080", "RTX 4090"),
        ("H200", None),
        ("TPU", None),
    ],
)
def test_did_you_mean(name: str, meant: str | None) -> None:
    known = ["A100 SXM4", "H100 SXM", "L40S", "RTX 3090", "RTX 4090", "RTX A6000"]
    assert did_you_mean(name, known) == meant


def test_the_renters_no_offer_error_is_the_diagnosis(fakevast: FakeVast, tmp_path: Path) -> None:
    """A job that finds no offer when it rents (the run's check before renting may not
    have seen it) fails with the diagnosis, made once however often it asks."""
    api = Marketplace(fakevast.api_key, fakevast.url)
    table = InstanceTable()
    renter = Renter(
        api,
        Ledger(tmp_path),
        table,
        OfferSearch(api, "dph_total"),
        RentPlan("test", Caps(), exclusive=False, onstart=""),
        spend=lambda: 0.0,
        excluded=ExcludedHosts(),
    )
    request = request_of(
        FakeJob({"gpu": 1, "gpu_model": "RTX_4090"}),
        ExecutorSettings(geolocation="EU", max_price=1.0),
    )
    reserved = Instance(make_label("test", "train-1"), request.signature())
    with table.locked():
        table.add(reserved)

    errors = []
    for _ in range(3):
        with pytest.raises(NoOfferError) as raised:
            renter.rent(reserved, request)
        errors.append(str(raised.value))

    searches = fakevast.ledger()["api_calls"]["POST /api/v0/bundles/"]
    diagnosis_searches = 6  # GPU models; gpu_model, region, reliability, datacenter, price
    assert searches <= 3 * 2 + diagnosis_searches  # each rent searches; one diagnosis
    assert errors == [diagnose(request, market_search(api)).message] * 3
    assert "With `--vastai-reliability 0.97` (now 0.98, the default)" in errors[0]
    assert "PUT /api/v0/asks/{id}/" not in fakevast.ledger()["api_calls"]
