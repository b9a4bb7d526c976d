"""A run's memory does not grow with the jobs it has run (``Executor._runs``), and the scale
benchmark that measures it (``benchmarks/scale.py``) runs.

Why: the executor kept every job's state (its JobRun: spec, command, environment, placement,
stream, outcome) for the whole run, so a workflow of a hundred thousand jobs grew the
controller by all of them. Once Snakemake has a job's outcome nothing of the plugin's may hold
it. Real Snakemake runs against the fake; nothing may be left alive in it. How much memory the
controller takes at 1,000 and 5,000 jobs is measured by the benchmark, never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.measure import FakeBill
from benchmarks.scale import (
    RSS_GROWTH_BUDGET,
    THREADS_BESIDE_JOBS,
    SizeResult,
    budgets,
    run_size,
)
from benchmarks.workflows import Workflow, load_outputs
from tests.fakevast.harness import FakeVast
from tests.jobrun_census import census
from tests.workflows import assert_all_destroyed
from tests.wrapped import run_wrapped

JOBS = 8
PARALLEL = 2
TIMEOUT_SECONDS = 300


def test_a_jobs_state_is_let_go_once_snakemake_has_its_outcome(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = Workflow("scale", JOBS, PARALLEL).create(tmp_path / "wf")

    run = run_wrapped("jobrun_census", workdir, fakevast, jobs=PARALLEL, timeout=TIMEOUT_SECONDS)

    assert run.ok, run.output[-5000:]
    alive, made = census(run.output)
    assert made == JOBS, run.output[-5000:]
    assert alive == 0, f"{alive} of {made} JobRuns still alive after every outcome was reported"
    for name, text in load_outputs(JOBS, "scale").items():
        assert (workdir / name).read_text() == text
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_the_scale_case_is_measured(tmp_path: Path) -> None:
    result = run_size(16, 8, tmp_path / "scale", boot_seconds=0)

    assert result.problems == [], result.problems
    assert result.exit_status == 0 and result.outputs_correct == 16
    assert result.instances_left_alive == 0 and result.bill.nothing_left_running
    assert result.bill.instances >= 1
    assert result.peak_rss_mb > 0 and result.local_peak_rss_mb > 0
    assert result.peak_threads > 0 and result.local_peak_threads > 0
    data = result.to_json()
    assert {"plugin_rss_mb", "instances", "api_calls_total", "ok"} <= set(data)


def size(jobs: int, rss: float, local: float, threads: int) -> SizeResult:
    bill = FakeBill(1, 1.0, 0.01, 0.0, True, {}, 0, 0)
    return SizeResult(
        jobs, 64, 0, 1.0, rss, threads, 1.0, local, 5, 1.0, jobs, 0, bill, None, (0.0, 0.0)
    )


def test_the_budgets_take_snakemakes_own_growth_out() -> None:
    small, large = size(1000, 200.0, 150.0, 80), size(5000, 260.0, 205.0, 90)
    found = budgets([large, small])

    assert found["sizes"] == [1000, 5000]
    assert found["peak_rss_growth"] == pytest.approx(0.3)
    assert not found["peak_rss_growth_met"]
    assert found["local_peak_rss_growth"] == pytest.approx(55 / 150, abs=1e-4)
    # The plugin's share: 50 MB at 1,000 jobs, 55 MB at 5,000: 2.5 % of the controller.
    assert found["plugin_rss_growth_of_controller"] == pytest.approx(0.025)
    assert found["plugin_rss_growth_met"] and RSS_GROWTH_BUDGET == 0.10
    assert found["thread_limit"] == 64 + THREADS_BESIDE_JOBS and found["threads_met"]
    assert budgets([small]) == {}
