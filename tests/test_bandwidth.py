"""Bandwidth is money (``vast-api.md`` section 10): Vast.ai bills every byte an instance
sends or receives at the offer's $/GB. A real run whose output comes back over SSH from a
host at $0.20/GB: the cost summary, ``snakemake-vastai cost`` and the fake's own bill agree on
the data dollars, and ``--vastai-budget`` counts them. (200 MB at $0.20/GB stands for the
issue's 2 GB at $0.02/GB: the same $0.04, ten times less disk and time.)"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.test_cli import HELPER
from tests.test_pool_faults import FLAT_OFFERS
from tests.workflows import (
    assert_all_destroyed,
    job_errors,
    rented,
    run_snakemake,
    run_summary,
    write_workflow,
)

OUTPUT_BYTES = 200_000_000
UP_COST = 0.20  # $/GB the host sends: our download of its output
DATA_DOLLARS = OUTPUT_BYTES / 1e9 * UP_COST  # $0.04
BUDGET = 0.12  # a second rent fits the budget without the data ($0.10 ahead), not with it

BIG_THEN_OTHER = f"""\
localrules: all


rule all:
    input: "big.bin", "other.txt"


rule big:
    output: "big.bin"
    resources: gpu=1
    shell: "head -c {OUTPUT_BYTES} /dev/urandom > {{output}}"


rule other:
    input: "big.bin"
    output: "other.txt"
    resources: gpu=1, vastai_query="cpu_cores_effective>=2"
    shell: "echo other > {{output}}"
"""


def priced_offers(tmp_path: Path) -> Path:
    offers = json.loads(FLAT_OFFERS.read_text())
    path = tmp_path / "offers.json"
    path.write_text(
        json.dumps([o | {"inet_up_cost": UP_COST, "inet_down_cost": 0.0} for o in offers])
    )
    return path


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_the_bytes_of_an_output_are_billed_and_counted_toward_the_budget(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    fake = fakevast_factory(offers=priced_offers(tmp_path))
    workdir = write_workflow(tmp_path / "wf", BIG_THEN_OTHER)

    run = run_snakemake(workdir, fake, "--vastai-budget", str(BUDGET), jobs=1)

    assert not run.ok  # the second rent would pass the budget once the data is counted
    assert (workdir / "big.bin").stat().st_size == OUTPUT_BYTES
    [error] = job_errors(run.output)
    assert "--vastai-budget $0.12" in error, error
    [instance] = assert_all_destroyed(fake, workdir)
    summary = run_summary(workdir)["totals"]
    # SSH's own bytes come on top of the file's: a few percent at most.
    assert DATA_DOLLARS <= summary["data_dollars"] <= DATA_DOLLARS * 1.05, summary
    assert instance["bandwidth_cost"] == pytest.approx(summary["data_dollars"], rel=0.01)
    assert "is bandwidth (bytes to and from the instances" in run.output
    cost = subprocess.run(
        [HELPER, "--workdir", str(workdir), "cost"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    run_row = cost.splitlines()[1].split()
    assert float(run_row[4]) == pytest.approx(summary["data_dollars"], abs=1e-4), cost
    assert rented(fake) == [instance]


INPUT_BYTES = 50_000_000
CHEAP_HOURLY, CHEAP_DATA = 9300001, 9300002  # $0.30/h at $20/GB in, $0.40/h at $0.01/GB in

READ_INPUT = """\
localrules: all


rule all:
    input: "size.txt"


rule size:
    input: "data.bin"
    output: "size.txt"
    resources: gpu=1{runtime}
    shell: "wc -c < {{input}} > {{output}}"
"""


def two_hosts(tmp_path: Path) -> Path:
    """A host cheap by the hour that charges $20 per GB it receives, and one $0.10/h dearer
    whose bandwidth is nearly free."""
    [base, *_] = json.loads(FLAT_OFFERS.read_text())
    rows = [
        base | {"id": CHEAP_HOURLY, "dph_base": 0.30, "inet_down_cost": 20.0, "inet_up_cost": 0.0},
        base
        | {"id": CHEAP_DATA, "machine_id": 99, "dph_base": 0.40, "inet_down_cost": 0.01}
        | {"inet_up_cost": 0.0},
    ]
    path = tmp_path / "offers.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize(
    ("input_bytes", "runtime", "chosen"),
    [(INPUT_BYTES, "", CHEAP_DATA), (1_000, "", CHEAP_HOURLY), (INPUT_BYTES, 900, CHEAP_HOURLY)],
    ids=["50 MB of inputs", "1 kB of inputs", "50 MB for 15 hours"],
)
def test_an_offer_is_ranked_by_the_jobs_whole_cost_with_its_inputs(
    fakevast_factory: Callable[..., FakeVast],
    tmp_path: Path,
    input_bytes: int,
    runtime: int | str,
    chosen: int,
) -> None:
    """50 MB up at $20/GB is $1.00, more than the $0.10 an hour the other host adds (a job
    without a runtime counts as an hour): that host is rented, and the run says why. 1 kB
    up costs nothing worth a dearer hour, and neither does $1.00 against 15 dearer hours."""
    fake = fakevast_factory(boot_seconds=0, offers=two_hosts(tmp_path))
    snakefile = READ_INPUT.format(runtime=f", runtime={runtime}" if runtime else "")
    workdir = write_workflow(tmp_path / "wf", snakefile, {"data.bin": "x" * input_bytes})

    run = run_snakemake(workdir, fake, jobs=1)

    assert run.ok, run.output
    assert (workdir / "size.txt").read_text().strip() == str(input_bytes)
    [instance] = assert_all_destroyed(fake, workdir)
    assert instance["offer_id"] == chosen, instance
    note = f"offer {CHEAP_DATA} ($0.400/h) comes before offer {CHEAP_HOURLY} ($0.300/h)"
    assert (note in run.output) == (chosen == CHEAP_DATA), run.output
