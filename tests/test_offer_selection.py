"""Which offer a job gets: job resources and ``--vastai-*`` options become a ResourceRequest,
whose offer query goes through the plugin's own Marketplace.search to a running fake, and the
ranking that comes back must be the one the catalogue implies.

The expectation is computed twice, independently of the plugin and of the fake's search code:
by a plain-Python filter and sort over ``tests/fakevast/offers.json`` (written from the
documented meaning of each filter), and by hand (the ``first`` column, checked against the
catalogue when the table was written). The test asserts that the two agree and that the
plugin returns that ranking.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.edge.resources import request_of
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.market.marketplace import Marketplace
from tests.fakevast.catalog import DEFAULT_OFFERS
from tests.fakevast.harness import FakeVast
from tests.test_resources import FakeJob

Offer = dict[str, Any]
CATALOGUE: list[Offer] = json.loads(DEFAULT_OFFERS.read_text())
# The catalogue's countries that lie in Europe (the EU region of --vastai-geolocation).
EUROPE = {"NL", "PL", "DE", "FR", "SE"}
HOURS_PER_MONTH = 720


def price(offer: Offer, disk_gb: float) -> float:
    """dph_total: the machine's hourly price plus the rented disk's (storage_cost is $/GB/month)."""
    return offer["dph_base"] + offer["storage_cost"] * disk_gb / HOURS_PER_MONTH


def country(offer: Offer) -> str:
    return offer["geolocation"][-2:]


def listed(offer: Offer) -> bool:
    """The SDK's default filters: verified, not external, rentable."""
    return offer["verification"] == "verified" and not offer["external"] and offer["rentable"]


def datacenter(offer: Offer) -> bool:
    return offer["hosting_type"] == 1


def reliable(at_least: float) -> Callable[[Offer], bool]:
    return lambda offer: offer["reliability"] >= at_least


def plugin_defaults(offer: Offer) -> bool:
    """One GPU or more, 40 GB disk, reliability >= 0.98, datacenters only."""
    return (
        listed(offer)
        and offer["num_gpus"] >= 1
        and offer["disk_space"] >= 40
        and reliable(0.98)(offer)
        and datacenter(offer)
    )


def cheapest(offer: Offer, disk_gb: float) -> float:
    return price(offer, disk_gb)


def most_dlperf_per_dollar(offer: Offer, disk_gb: float) -> float:
    return -offer["dlperf"] / price(offer, disk_gb)


@dataclass(frozen=True)
class Case:
    """``wanted`` decides from the offer alone; the request's disk size prices it."""

    first: int  # checked by hand
    wanted: Callable[[Offer], bool]
    resources: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    rank: Callable[[Offer, float], float] = cheapest


def _and(*tests: Callable[[Offer], bool]) -> Callable[[Offer], bool]:
    return lambda offer: all(test(offer) for test in tests)


def _with(name: str, check: Callable[[Any], bool]) -> Callable[[Offer], bool]:
    return lambda offer: check(offer[name])


BASELINE = 9210024  # the cheapest reliable datacenter offer: what a plain job gets
ANY_RELIABLE_DATACENTER = _and(listed, datacenter, _with("disk_space", lambda v: v >= 40))

CASES: dict[str, Case] = {
    "defaults": Case(BASELINE, plugin_defaults),
    "gpu=2": Case(9210012, _and(plugin_defaults, _with("num_gpus", lambda n: n >= 2)), {"gpu": 2}),
    "gpu_model": Case(
        9210032,
        _and(plugin_defaults, _with("gpu_name", lambda n: n == "H100 SXM")),
        {"gpu_model": "H100_SXM"},
    ),
    "--vastai-gpu-name": Case(
        9210020,
        _and(ANY_RELIABLE_DATACENTER, _with("gpu_name", lambda n: n == "RTX 3090")),
        options={"gpu_name": "RTX_3090", "reliability": 0},
    ),
    "gpu_model beats --vastai-gpu-name": Case(
        9210025,
        _and(ANY_RELIABLE_DATACENTER, _with("gpu_name", lambda n: n == "RTX A6000")),
        {"gpu_model": "RTX A6000"},
        options={"gpu_name": "RTX_3090", "reliability": 0},
    ),
    "threads": Case(
        9210013, _and(plugin_defaults, _with("cpu_cores_effective", lambda c: c >= 40)), threads=40
    ),
    "mem_mb": Case(
        9210012, _and(plugin_defaults, _with("cpu_ram", lambda mb: mb >= 60000)), {"mem_mb": 60000}
    ),
    "disk_mb (also prices 500 GB)": Case(
        9210013,
        _and(plugin_defaults, _with("disk_space", lambda gb: gb >= 500)),
        {"disk_mb": 500_000},
    ),
    "region": Case(
        9210014,
        _and(plugin_defaults, lambda o: country(o) in EUROPE),
        options={"geolocation": "EU"},
    ),
    "country": Case(
        9210032, _and(plugin_defaults, lambda o: country(o) == "US"), options={"geolocation": "us"}
    ),
    "no datacenter": Case(
        9210019,
        _and(listed, reliable(0.98), _with("disk_space", lambda gb: gb >= 40)),
        options={"no_datacenter": True},
    ),
    "no reliability filter": Case(9210020, ANY_RELIABLE_DATACENTER, options={"reliability": 0}),
    "order dlperf_usd-": Case(
        9210013, plugin_defaults, options={"order": "dlperf_usd-"}, rank=most_dlperf_per_dollar
    ),
    "max price": Case(
        9210012,
        _and(plugin_defaults, lambda o: price(o, 40) <= 1.1),
        options={"order": "dlperf_usd-", "max_price": 1.1},
        rank=most_dlperf_per_dollar,
    ),
    "vastai_query": Case(
        9210014,
        _and(plugin_defaults, _with("inet_down", lambda mbps: mbps >= 1000)),
        {"vastai_query": "inet_down>=1000"},
    ),
    "--vastai-search-query": Case(
        9210032,
        _and(plugin_defaults, _with("cuda_max_good", lambda v: v >= 12.8)),
        options={"search_query": "cuda_vers>=12.8"},
    ),
    "--vastai-search-query overrides a default": Case(
        9210020,
        _and(ANY_RELIABLE_DATACENTER, reliable(0.97)),
        options={"search_query": "reliability>=0.97"},
    ),
    "everything at once": Case(
        9210004,
        _and(
            listed,
            reliable(0.95),
            _with("gpu_name", lambda n: n == "RTX 4090"),
            _with("cpu_cores_effective", lambda c: c >= 16),
            _with("cpu_ram", lambda mb: mb >= 60000),
            _with("disk_space", lambda gb: gb >= 40),
            lambda o: country(o) in EUROPE,
        ),
        {"gpu": 1, "gpu_model": "RTX_4090", "mem_mb": 60000},
        threads=16,
        options={"geolocation": "EU", "no_datacenter": True, "reliability": 0.95},
    ),
}


def reference_ranking(case: Case, disk_gb: float) -> list[int]:
    matching = [offer for offer in CATALOGUE if case.wanted(offer)]
    return [o["id"] for o in sorted(matching, key=lambda o: (case.rank(o, disk_gb), o["id"]))]


@pytest.fixture(scope="module")
def market() -> Iterator[Marketplace]:
    """One fake for the whole table: searching rents nothing, so nothing can be left over."""
    with FakeVast(rate_limits=False) as fake:
        yield Marketplace(fake.api_key, fake.url)
        assert fake.ledger()["instances"] == []


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_first_offer(market: Marketplace, case: Case) -> None:
    settings = ExecutorSettings(**case.options)
    request = request_of(FakeJob(case.resources, case.threads), settings)

    offers = market.search(request.offer_query(), settings.order, request.disk_gb)

    expected = reference_ranking(case, request.disk_gb)
    assert expected[:1] == [case.first], "the hand-checked id disagrees with the reference"
    assert [offer.id for offer in offers] == expected[:20], request.offer_query()
    assert offers[0].dph_total == pytest.approx(
        price(next(o for o in CATALOGUE if o["id"] == case.first), request.disk_gb)
    )


def test_every_case_can_fail() -> None:
    """A case whose expected offer is the one a plain job gets would pass even if the plugin
    ignored its resource or option."""
    for name, case in CASES.items():
        if name != "defaults":
            assert case.first != BASELINE, name
