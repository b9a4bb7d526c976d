"""The benchmarks' load case as a correctness test: many short jobs while the API errs.

Why: a run of hundreds of jobs at --jobs 32 is where rare things meet (a 503 on a create, a
429 on a destroy, many instances booting and finishing at once), and a pool that loses track
of one instance keeps it billing. This runs the workload of ``python -m benchmarks --case
load`` (the same Snakefile, catalogue, boot and fault mix; fewer jobs; the tests' usual
command line, ``tests.workflows.run_snakemake``) with and without packing and checks only
the outcome: Snakemake succeeds, every output is there with the right text, and
nothing is left rented. How long it takes is the benchmark's business, not asserted here.

Without Vast.ai's rate limits (the fixture's default, and so an unpaced plugin), for speed:
the injected 429s and 503s are what this test is about, and the limits' cost on the same
workload is measured by the benchmark, which runs with them on and fails on a refused call.
With them both variants together take about 7 min instead of 1.5 (creates 4.5 s apart, and
a 12 s penalty the plugin keeps after each injected 429 on a create).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.load import BOOT_SECONDS, FAULTS, VARIANTS, write_offers
from benchmarks.workflows import Workflow, load_outputs
from tests.fakevast.harness import FakeVast
from tests.workflows import assert_all_destroyed, run_snakemake

JOBS = 100  # the benchmark runs 500; 100 keeps both variants together near 1.5 min on 2 CPUs
PARALLEL = 32
TIMEOUT_SECONDS = 900  # a hang fails the test; a normal run takes a few minutes


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_under_api_errors_completes_and_cleans_up(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path, variant: str
) -> None:
    # No rate limits, for speed (see the module's docstring).
    fake = fakevast_factory(
        boot_seconds=BOOT_SECONDS, offers=write_offers(tmp_path / "offers.json")
    )
    fake.set_faults(FAULTS)
    workdir = Workflow("load", JOBS, PARALLEL).create(tmp_path / "workflow")

    run = run_snakemake(workdir, fake, *VARIANTS[variant], jobs=PARALLEL, timeout=TIMEOUT_SECONDS)

    assert run.ok, run.output[-5000:]
    wrong = {
        name: got
        for name, text in load_outputs(JOBS).items()
        if (got := read(workdir / name)) != text
    }
    assert not wrong, (
        f"{len(wrong)} of {JOBS} outputs missing or wrong: {sorted(wrong.items())[:5]}"
    )
    assert_all_destroyed(fake, workdir)


def read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
