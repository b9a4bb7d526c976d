"""Fewer searches, never a wrong answer: requests that differ only in their GPU model share
one search (`gpu_name in [...]`), whose answer is trusted for a model only where it must be
complete; and under the rate limits, answers are shelved for a minute for every process of
the same key (the `offers` command, a second workflow), dropped offers included."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.edge.resources import request_of
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.market.marketplace import Marketplace
from snakemake_executor_plugin_vastai.market.request import ResourceRequest
from snakemake_executor_plugin_vastai.pool.renter import (
    EMPTY_SEARCH_SECONDS,
    SEARCH_LIMIT,
    OfferSearch,
)
from tests.fakevast.harness import FakeVast
from tests.test_pool_faults import assert_outputs, fan_out
from tests.test_preflight import searches
from tests.test_resources import FakeJob
from tests.workflows import assert_all_destroyed, run_snakemake, write_workflow

CATALOGUE = Path(__file__).parent / "fakevast" / "offers.json"
ORDER = "dph_total"


def request(gpu_model: str | None) -> ResourceRequest:
    resources: dict[str, Any] = {"gpu": 1}
    if gpu_model is not None:
        resources["gpu_model"] = gpu_model
    return request_of(FakeJob(resources), ExecutorSettings())


def offers_file(target: Path, common: int, rare: int) -> Path:
    """``common`` RTX 4090 offers at $0.30/h and ``rare`` RTX 3060 at $0.50/h, all of them
    datacenter offers the default filters keep."""
    rows = json.loads(CATALOGUE.read_text())
    rows = rows["offers"] if isinstance(rows, dict) else rows
    [model] = [row for row in rows if row["hosting_type"] == 1 and row["reliability"] >= 0.98][:1]
    made = []
    for number in range(common + rare):
        name, price = ("RTX 4090", 0.30) if number < common else ("RTX 3060", 0.50)
        made.append(
            {
                **model,
                "id": 9300000 + number,
                "machine_id": 60000 + number,
                "gpu_name": name,
                "dph_base": price,
            }
        )
    target.write_text(json.dumps(made))
    return target


def search_of(fake: FakeVast, paced: bool = False, ttl: float = 3600) -> OfferSearch:
    return OfferSearch(Marketplace(fake.api_key, fake.url, paced=paced), ORDER, ttl=ttl)


def found(search: OfferSearch, wanted: ResourceRequest) -> list[int]:
    return [offer.id for offer in search.offers(wanted.offer_query(), wanted.disk_gb)]


def test_a_complete_family_answer_settles_every_model_in_one_search(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    fake = fakevast_factory(offers=offers_file(tmp_path / "offers.json", common=3, rare=2))
    search = search_of(fake)
    asked = [request("RTX_4090"), request("RTX_3060"), request("B200"), request(None)]

    search.prefetch(asked)

    assert searches(fake) == 1
    assert len(found(search, asked[0])) == 3
    assert len(found(search, asked[1])) == 2
    assert found(search, asked[2]) == []  # complete: no B200 anywhere
    assert len(found(search, asked[3])) == 5
    assert searches(fake) == 1


def test_a_truncated_family_answer_leaves_a_rare_model_to_its_own_search(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """2 x SEARCH_LIMIT cheaper RTX 4090 offers fill the shared answer: it says nothing of
    the RTX 3060, which is then searched alone and found."""
    common = 2 * SEARCH_LIMIT + 5
    fake = fakevast_factory(offers=offers_file(tmp_path / "offers.json", common, rare=1))
    search = search_of(fake)
    common_model, rare_model = request("RTX_4090"), request("RTX_3060")

    search.prefetch([common_model, rare_model])

    assert len(found(search, common_model)) == SEARCH_LIMIT
    assert searches(fake) == 1
    assert found(search, rare_model) == [9300000 + common]
    assert searches(fake) == 2


def test_a_model_named_in_another_case_is_not_settled_by_the_shared_answer(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """The real marketplace may compare names without case; the fake does not. The shared
    answer (any model) lists an RTX 3060, so `rtx_3060` gets its own search rather than
    an empty answer taken from the shared one."""
    fake = fakevast_factory(offers=offers_file(tmp_path / "offers.json", common=2, rare=1))
    search = search_of(fake)
    lower = request("rtx_3060")

    search.prefetch([request(None), lower])
    found(search, lower)

    assert searches(fake) == 2


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_second_process_of_the_key_takes_the_shelved_answer_less_what_was_taken(
    fakevast: FakeVast, cache_home: Path
) -> None:
    first, second = search_of(fakevast, paced=True), search_of(fakevast, paced=True)
    wanted = request(None)

    offered = found(first, wanted)
    first.drop(offered[0])  # rented by the first process

    assert found(second, wanted) == offered[1:]
    assert searches(fakevast) == 1


def test_a_shelved_answer_older_than_its_life_is_searched_again(
    fakevast: FakeVast, cache_home: Path
) -> None:
    wanted = request(None)
    found(search_of(fakevast, paced=True, ttl=0.5), wanted)
    stale = search_of(fakevast, paced=True, ttl=0.5)
    stale.shelf.clock = lambda: 10**10  # type: ignore[union-attr]  # long after the search

    assert found(stale, wanted)
    assert searches(fakevast) == 2


def test_a_damaged_shelf_is_searched_afresh_and_rewritten(
    fakevast: FakeVast, cache_home: Path
) -> None:
    search = search_of(fakevast, paced=True)
    assert search.shelf is not None
    search.shelf.path.parent.mkdir(parents=True)
    search.shelf.path.write_text('{"not": "a shelf"')

    assert found(search, request(None))
    assert searches(fakevast) == 1
    assert json.loads(search.shelf.path.read_text())  # whole again


def test_without_the_rate_limits_nothing_is_shelved(fakevast: FakeVast, cache_home: Path) -> None:
    first, second = search_of(fakevast), search_of(fakevast)
    wanted = request(None)

    found(first, wanted)
    found(second, wanted)

    assert first.shelf is None
    assert searches(fakevast) == 2
    assert not cache_home.exists()


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_a_job_that_waits_for_the_runs_instance_costs_no_diagnosis(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """One offer, two jobs that may not share an instance: the second finds no offer and
    waits for the first one's instance. Why no offer matches is never shown, so it is
    never worked out (it costs a search per filter)."""
    fake = fakevast_factory(
        boot_seconds=1, offers=offers_file(tmp_path / "offers.json", common=1, rare=0)
    )
    workdir = write_workflow(tmp_path / "wf", fan_out(2, sleep=3))

    run = run_snakemake(workdir, fake, "--vastai-no-pack", jobs=2)

    assert run.ok, run.output
    assert_outputs(workdir, 2)
    waited = "No offer matches rule work now. Waiting for one of the run's instances."
    assert waited in run.output
    assert "With `--vastai" not in run.output and "With resource" not in run.output
    # check, rent, one more look; and the empty copy looked at again at most every
    # EMPTY_SEARCH_SECONDS while the job waits (a slow machine waits longer): a diagnosis
    # would cost a search per filter of the query at once
    relooks = int(run.seconds // EMPTY_SEARCH_SECONDS)
    assert searches(fake) <= 3 + relooks, fake.ledger()["api_calls"]
    assert_all_destroyed(fake, workdir)
