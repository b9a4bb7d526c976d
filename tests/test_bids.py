"""Interruptible (bid) instances for Snakemake's --preemptible-rules: how a bid is priced, and a
real run in which the bid instance is outbid mid-job and the job finishes on another one
without using up --retries."""

from __future__ import annotations

from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.market.marketplace import Offer
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    ANNOUNCE_START,
    assert_all_destroyed,
    job_errors,
    run_summary,
    running_snakemake,
    wait_until_running,
    write_workflow,
)

BID_FACTOR = 1.25  # the plugin's default --vastai-bid-factor


def bid_offer(min_bid: float = 0.20, storage: float = 0.01, base: float = 0.50) -> Offer:
    row = {
        "id": 1,
        "dph_total": min_bid + storage,
        "min_bid": min_bid,
        "dph_base": base,
        "machine_id": 7,
    }
    return Offer.from_api(row, interruptible=True)


def test_a_bid_is_the_minimum_times_the_factor_within_the_price_cap() -> None:
    offer = bid_offer()
    assert offer.storage_dph == pytest.approx(0.01)
    assert offer.on_demand_dph == pytest.approx(0.51)
    bid = offer.with_bid(1.25, None)
    assert bid is not None and bid.bid_price == pytest.approx(0.25)
    assert bid.dph_total == pytest.approx(0.26)
    capped = offer.with_bid(1.25, max_price=0.23)  # the cap counts the disk too
    assert capped is not None and capped.bid_price == pytest.approx(0.22)
    assert offer.with_bid(1.25, max_price=0.205) is None  # not even the minimum bid fits


PREEMPTIBLE = f"""\
rule all:
    input: "out.txt"

rule train:
    output: "out.txt"
    resources: attempt=lambda wildcards, attempt: attempt
    shell: "{ANNOUNCE_START}; if [ {{resources.attempt}} -eq 1 ]; then sleep 90; fi; "
           "echo done > {{output}}"
"""


@pytest.mark.slow
def test_an_outbid_job_finishes_on_another_instance_without_retries(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = write_workflow(tmp_path / "wf", PREEMPTIBLE)
    extra = ("--preemptible-rules", "train", "--preemptible-retries", "1", "--retries", "0")

    with running_snakemake(workdir, fakevast, *extra, jobs=1) as process:
        outbid = wait_until_running(fakevast, workdir, process)
        fakevast.set_faults({"instances": {str(outbid): {"stopped": True}}})
        returncode = process.wait(timeout=300)
    output = (workdir / "snakemake.out").read_text()

    assert returncode == 0, output
    assert (workdir / "out.txt").read_text() == "done\n"
    [error] = job_errors(output)
    assert "stopped" in error, error
    first, second = assert_all_destroyed(fakevast, workdir)
    assert first["id"] == outbid and first["destroyed_by"] == "user"  # at once, not left stopped
    assert second["machine_id"] != first["machine_id"]
    for row in (first, second):  # the fake recorded each as a bid, at the expected price
        assert row["bid_price"] == pytest.approx(round(row["min_bid"] * BID_FACTOR, 4))
    summary = run_summary(workdir)
    assert all(i["bid"] for i in summary["instances"])
    assert summary["totals"]["saved_by_bids"] > 0
