"""An instance gets only its share of the machine (``vast-api.md`` section 10): an offer's
``cpu_ram`` is the whole machine's RAM, and a one-GPU rent of a four-GPU machine gets a
quarter of it. Real runs on a catalogue of such shares: a job is never placed, nor packed,
where its share cannot hold it. Every test ends with the fake showing nothing alive."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.workflows import (
    INSTANCE_TOKEN,
    assert_all_destroyed,
    rented,
    run_snakemake,
    write_workflow,
)

MACHINE = {  # one 4-GPU machine with 256 GB and 32 cores, offered as quarter, half and whole
    "gpu_name": "RTX 4090", "storage_cost": 0.0, "hosting_type": 1, "cpu_cores": 32.0,
    "cpu_ram": 256000, "geolocation": "Oregon, US", "machine_id": 777,
}  # fmt: skip
QUARTER = {"id": 9400001, "num_gpus": 1, "cpu_cores_effective": 8.0, "dph_base": 0.30}
HALF = {"id": 9400002, "num_gpus": 2, "cpu_cores_effective": 16.0, "dph_base": 0.60}
WHOLE = {"id": 9400003, "num_gpus": 4, "cpu_cores_effective": 32.0, "dph_base": 1.20}


def catalogue(tmp_path: Path, offers: list[dict]) -> Path:
    path = tmp_path / "offers.json"
    path.write_text(json.dumps([MACHINE | offer for offer in offers]))
    return path


BIG_JOB = """\
localrules: all


rule all:
    input: "big.txt"


rule big:
    output: "big.txt"
    resources: gpu=1, mem_mb=100000
    shell: "echo big > {output}"
"""


def test_a_job_larger_than_a_quarter_rents_a_half(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """100 GB on a 256 GB machine offered in quarters (64 GB each): the quarter is cheapest
    and its search filter (cpu_ram of the machine) matches, but the job gets a half."""
    fake = fakevast_factory(offers=catalogue(tmp_path, [QUARTER, HALF, WHOLE]))
    workdir = write_workflow(tmp_path / "wf", BIG_JOB)

    run = run_snakemake(workdir, fake, jobs=1)

    assert run.ok, run.output
    [instance] = assert_all_destroyed(fake, workdir)
    assert instance["offer_id"] == HALF["id"], instance


# Each job writes which instance it ran on, and when it started and ended.
SPAN = f"t=$({INSTANCE_TOKEN}); s=$(date +%s.%N); sleep 3; echo $t $s $(date +%s.%N) > {{output}}"
FOUR_CPU_JOBS = f"""\
localrules: all


rule all:
    input: expand("out/{{i}}.txt", i=range(4))


rule work:
    output: "out/{{i}}.txt"
    resources: mem_mb=40000
    shell: {SPAN!r}
"""


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_a_64_gb_share_runs_one_40_gb_job_at_a_time(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """Four 40 GB jobs at --jobs 4 on quarters (64 GB each): two would need 80 GB, so no
    instance ever runs two of them at once (counting the whole machine, all four would have
    been packed onto one)."""
    quarters = [QUARTER | {"id": 9400010 + n, "machine_id": 780 + n} for n in range(4)]
    fake = fakevast_factory(offers=catalogue(tmp_path, quarters))
    workdir = write_workflow(tmp_path / "wf", FOUR_CPU_JOBS)

    run = run_snakemake(workdir, fake, jobs=4)

    assert run.ok, run.output
    spans: dict[str, list[tuple[float, float]]] = {}
    for i in range(4):
        token, start, end = (workdir / f"out/{i}.txt").read_text().split()
        spans.setdefault(token, []).append((float(start), float(end)))
    for token, runs in spans.items():
        runs.sort()
        overlaps = [(a, b) for a, b in itertools.pairwise(runs) if b[0] < a[1]]
        assert not overlaps, f"two 40 GB jobs at once on one 64 GB share ({token}): {runs}"
    assert all(row["ram_share_mb"] == 64000 for row in rented(fake)), rented(fake)
    assert_all_destroyed(fake, workdir)
