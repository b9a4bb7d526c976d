"""The cheaper offers that the safe defaults leave out are named, in one line, by ``offers``
and at the run's first rent (issue 20, item 3).

Why: ``offers`` picked a $0.61/h datacenter offer while a $0.066/h offer from a hobbyist host
stayed invisible until a price cap failed. The defaults (datacenters only, reliability 0.98)
are safe, so they stay; the user is only told what they cost and which options lift them.

On the bundled catalogue (tests/fakevast/offers.json, 40 GB of disk), checked by hand: the
defaults' cheapest offer is the RTX A6000 in Tokyo ($0.60/h + 40 GB at $0.15/GB a month =
$0.608/h). Without them, 17 verified, rentable offers are cheaper, the cheapest the RTX 3060 in
Oregon ($0.06/h + 40 GB at $0.10 = $0.066/h); the offers below $0.608/h that are not counted
are unverified, deverified, not rentable or external, which the SDK's own filters leave out.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakevast.harness import FakeVast
from tests.test_preview import offers
from tests.workflows import (
    assert_all_destroyed,
    assert_nothing_rented,
    one_rule_workflow,
    rented,
    run_snakemake,
    write_workflow,
)

NOTE = (
    "The defaults leave out 17 cheaper offers (from $0.066/h): hosts outside datacenters "
    "(--vastai-no-datacenter) and reliability below 0.98 (--vastai-reliability)."
)
# Two jobs at once, each with the one GPU of a catalogue offer: two rents.
TWO_RENTS = """\
rule all:
    input: "a.txt", "b.txt"


rule make:
    output: "{name}.txt"
    resources: gpu=1
    shell: "echo {wildcards.name} > {output}"
"""
SEARCH = "POST /api/v0/bundles/"


def searches(fake: FakeVast) -> int:
    return fake.ledger()["api_calls"].get(SEARCH, 0)


def test_offers_names_what_the_defaults_leave_out(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    done = offers(fakevast, workdir)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines.count(f"  {NOTE}") == 1, done.stdout
    first_offer = lines[lines.index("rule make: 1 job") + 3]
    assert first_offer.split()[:4] == ["0.608", "1x", "RTX", "A6000"], done.stdout
    assert_nothing_rented(fakevast)


def test_offers_with_one_default_lifted_names_the_other(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    done = offers(fakevast, workdir, "--no-datacenter")

    assert done.returncode == 0, done.stderr
    # The RTX 3060s in Oregon and Bavaria, both at 95.4%, are below the RTX 3090 in France.
    assert (
        "  The defaults leave out 2 cheaper offers (from $0.066/h): reliability below 0.98 "
        "(--vastai-reliability).\n"
    ) in done.stdout
    assert_nothing_rented(fakevast)


def test_a_run_says_it_once_at_its_first_rent(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = write_workflow(tmp_path / "wf", TWO_RENTS)

    run = run_snakemake(workdir, fakevast, jobs=2)

    assert run.ok, run.output
    assert len(rented(fakevast)) == 2, rented(fakevast)
    assert NOTE in run.output, run.output
    assert run.output.count("The defaults leave out") == 1, run.output  # not at the 2nd rent
    assert searches(fakevast) == 2  # the check before renting, and one without the defaults
    assert_all_destroyed(fakevast, workdir)


def test_a_run_without_those_defaults_says_nothing(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    run = run_snakemake(
        workdir, fakevast, "--vastai-no-datacenter", "--vastai-reliability", "0", jobs=1
    )

    assert run.ok, run.output
    assert "The defaults leave out" not in run.output, run.output
    assert searches(fakevast) == 1  # the check before renting: no search to compare with
    assert_all_destroyed(fakevast, workdir)
