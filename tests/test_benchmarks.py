"""The benchmark machinery on tiny cases, and its target arithmetic on made-up numbers.

Why: ``python -m benchmarks`` takes minutes, so its parts are checked here in seconds: one
real three-job chain of 0.1 s jobs through the warm pool against the fake (ledger, summary,
probes, per-warm-job figures), the edit-and-rerun loop with one evaluation and a 2 s boot,
the idle gap at a 2 s boot and a 3 s gap, and the targets and ratios the results file
reports. Only structure is checked: timing is measured by the benchmarks, never asserted here.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.__main__ import (
    load_result_name,
    parse,
    pause_result_name,
    rerun_result_name,
    result_name,
    standard_cases,
)
from benchmarks.load import FAULTS, faults_fired
from benchmarks.measure import Case, CaseResult, FakeBill, run_case
from benchmarks.pause import PauseResult, pause_document, render_pause
from benchmarks.pause import run_mode as run_pause_mode
from benchmarks.report import document, render, speedups, targets, warm_overhead
from benchmarks.rerun import MODES, LoopResult, render_rerun, rerun_document, run_mode
from benchmarks.workflows import Workflow, pause_workflow


def test_chain_in_the_pool_is_measured(tmp_path: Path) -> None:
    result = run_case(Case(Workflow("tiny", 3, 1), "pool", 0.0), tmp_path / "case")

    output = tmp_path / "case" / "workflow" / "tiny" / "3.txt"
    assert output.read_text() == "seed\n1\n2\n3\n"
    assert result.bill is not None and result.bill.nothing_left_running
    assert result.bill.instances == 1
    assert result.bill.billed_instance_seconds > 0 and result.bill.dollars > 0
    assert result.bill.api_calls["PUT /api/v0/asks/{id}/"] == 1
    assert result.bill.ssh_round_trips > 0
    assert result.plugin_summary is not None and result.plugin_summary["jobs_run"] == 3
    # Every probe still finds its method: a warning names the ones skipped.
    log = (tmp_path / "case" / "snakemake.log").read_text()
    assert "benchmark probes skipped" not in log
    trace = [json.loads(line) for line in (tmp_path / "case" / "trace.jsonl").open()]
    collected = [e for e in trace if e["span"] == "collect"]
    assert len(collected) == 3 and all("job_cpu_seconds" in e["detail"] for e in collected)
    phases = result.phases
    assert phases is not None
    assert phases["cold"]["jobs"] == 1 and phases["warm"]["jobs"] == 2
    assert "schedule" in phases["cold"]["mean"]
    for name in ("stage", "start", "remote", "remote_launch", "collect", "release", "notice"):
        assert name in phases["warm"]["mean"]
    assert {"period", "ssh_round_trips", "remote_cpu_seconds"} <= set(phases["warm"]["median"])
    assert result.warm_period_seconds is not None and result.warm_period_seconds > 0
    assert result.ssh_round_trips_per_warm_job is not None
    assert result.remote_cpu_seconds_per_warm_job is not None
    assert result.output_period_seconds is not None
    # With Vast.ai's rate limits on (the benchmarks' default) and the plugin pacing itself.
    assert result.rate_limits and result.bill.refused_calls == 0
    assert result.teardown_seconds is not None and result.plugin_tree_sha256
    assert (tmp_path / "case" / "requests.json").is_file()
    doc = document({}, [result], 0.0)
    assert doc["cases"][0]["warm_overhead_seconds"] is None  # no local case to compare with
    assert "tiny/pool" in render(doc)


@pytest.mark.slow  # two modes of real runs side by side (README: Tests)
def test_the_edit_and_rerun_loop_is_measured(tmp_path: Path) -> None:
    """Both modes of the loop at tiny size: the kept mode's rerun adopts and rents nothing,
    the cold one rents again, and every figure the results file explains is there."""
    workflow = Workflow("rerun", 1, 4)

    def loop(mode: str) -> LoopResult:
        return run_mode(workflow, mode, tmp_path / mode, boot_seconds=2.0, gap_seconds=1.0)

    with ThreadPoolExecutor(len(MODES)) as modes:  # each its own fake and workdir: at once
        results = list(modes.map(loop, MODES))
    doc = rerun_document({}, workflow, 2.0, results, gap_seconds=1.0)

    cold, kept = doc["modes"]
    assert (cold["mode"], kept["mode"]) == ("cold", "kept")
    assert kept["rerun_creates"] == 0 and kept["rerun_adopted"] == 1
    assert cold["rerun_creates"] == 1 and cold["rerun_adopted"] == 0
    for mode in (cold, kept):
        assert set(doc["rerun"]["how"]) <= set(mode)
        assert mode["rerun_jobs"] == 1 and mode["rerun_first_job_seconds"] > 0
        assert mode["nothing_left_running"] and mode["refused_calls"] == 0
        assert mode["dollars"] > 0 and mode["idle_gap_seconds"] >= 1.0
    assert cold["idle_between_runs_dollars"] == 0 < kept["idle_between_runs_dollars"]
    [speedup] = doc["speedups_cold_over_mode"]
    assert speedup["mode"] == "kept" and speedup["rerun_wall"] and speedup["rerun_first_job"]
    log = (tmp_path / "kept" / "rerun" / "snakemake.log").read_text()
    assert "benchmark probes skipped" not in log
    assert "cold/kept" in render_rerun(json.loads(json.dumps(doc)))


@pytest.mark.slow  # two modes of real runs side by side (README: Tests)
def test_the_idle_gap_is_measured(tmp_path: Path) -> None:
    """The pause case at tiny size (2 s boot, 3 s gap, stopped after 1 s idle), destroy and
    stopped: the stopped mode rents once, stops its instance in the gap and starts it again,
    the destroy mode rents twice, and every figure the results file explains is there."""
    workflow = pause_workflow()
    modes = ("destroy", "stopped")

    def one(mode: str) -> PauseResult:
        return run_pause_mode(
            workflow, mode, tmp_path / mode, boot_seconds=2.0, gap_seconds=3.0, stop_after=1
        )

    with ThreadPoolExecutor(len(modes)) as pool:  # each its own fake and workdir: at once
        results = list(pool.map(one, modes))
    doc = pause_document({}, workflow, 2.0, results, gap_seconds=3.0, stop_after=1)

    destroy, stopped = doc["modes"]
    assert (destroy["mode"], stopped["mode"]) == ("destroy", "stopped")
    assert stopped["args"][:4] == ["--vastai-pool-ttl", "600", "--vastai-pool-stop-after", "1"]
    assert (stopped["creates"], stopped["stops"], stopped["starts"]) == (1, 1, 1)
    assert stopped["plugin_stopped_seconds"] > 0 and stopped["fake_gpu_free_seconds"] > 0
    assert stopped["restart_seconds"] > 0
    assert (destroy["creates"], destroy["stops"], destroy["starts"]) == (2, 0, 0)
    assert destroy["restart_seconds"] is None and destroy["plugin_stopped_seconds"] == 0
    for mode in (destroy, stopped):
        assert set(doc["pause"]["how"]) <= set(mode)
        assert mode["second_job_wait_seconds"] > 0 and mode["first_job_seconds"] > 0
        assert mode["nothing_left_running"] and mode["refused_calls"] == 0
        assert mode["gpu_dollars"] > 0 and mode["disk_dollars"] > 0
        assert mode["plugin_gpu_dollars"] > 0 and mode["plugin_storage_dollars"] > 0
        assert mode["gpu_dollars_gap_seconds"] is not None
        assert mode["disk_gb"] and all(gb > 0 for gb in mode["disk_gb"])
    [versus] = doc["ratios_stopped_over_mode"]
    assert versus["mode"] == "destroy" and versus["dollars"] and versus["second_job_wait"]
    log = (tmp_path / "stopped" / "run" / "snakemake.log").read_text()
    assert "benchmark probes skipped" not in log
    assert "stopped/destroy" in render_pause(json.loads(json.dumps(doc)))


def bill(instances: int, billed: float, calls: int, boot: float) -> FakeBill:
    return FakeBill(
        instances=instances,
        billed_instance_seconds=billed,
        dollars=billed * 0.4 / 3600,
        boot_seconds=boot,
        nothing_left_running=True,
        api_calls={"GET /api/v1/instances/": calls},
        ssh_bytes_up=1,
        ssh_bytes_down=1,
        ssh_round_trips=200,
    )


def test_targets_and_speedups_from_results() -> None:
    results = [
        CaseResult("chain", "local", 20, 1, 24.0, None, None, None, output_period_seconds=1.1),
        CaseResult("chain", "ttl0", 20, 1, 500.0, bill(20, 480.0, 120, 400.0), None, None),
        CaseResult(
            "chain",
            "pool",
            20,
            1,
            70.0,
            bill(1, 68.0, 30, 20.0),
            {"busy_seconds": 40.0},
            None,
            warm_period_seconds=1.3,
        ),
        CaseResult(
            "chain",
            "pool-rtt50",
            20,
            1,
            80.0,
            bill(1, 78.0, 30, 20.0),
            None,
            None,
            rtt_ms=50.0,
            warm_period_seconds=1.7,
        ),
        CaseResult("fanout", "local", 40, 8, 6.0, None, None, None),
        CaseResult("fanout", "pool", 40, 8, 40.0, bill(9, 200.0, 160, 160.0), None, None),
        CaseResult(
            "tiny",
            "pool",
            10,
            1,
            20.0,
            bill(1, 18.0, 10, 5.0),
            None,
            None,
            remote_cpu_seconds_per_warm_job=0.1,
        ),
    ]
    found = {t.name: t for t in targets(results, boot_seconds=20.0)}

    assert found["chain/pool instances == 1"].met
    wall = found["chain/pool wall <= boot + jobs x (local per-job + 1 s)"]
    assert wall.budget == pytest.approx(20 + 20 * (24.0 / 20 + 1))  # 64 s
    assert not wall.met and wall.ratio == pytest.approx(70 / 64, abs=1e-3)
    billed = found["chain/pool billed instance-s <= 1.2 x (boot + busy)"]
    assert billed.budget == pytest.approx(72.0) and billed.met
    assert not found["fanout/pool instances <= --jobs (8)"].met
    assert found["chain/pool API calls per job <= 3"].measured == 1.5
    assert not found["fanout/pool API calls per job <= 3"].met  # 160 / 40 = 4
    loopback = found["chain/pool warm overhead over local <= 0.25 s"]
    assert loopback.measured == pytest.approx(0.2) and loopback.met
    rtt = found["chain/pool-rtt50 warm overhead over local <= 0.5 s"]
    assert rtt.measured == pytest.approx(0.6) and not rtt.met
    assert found["tiny/pool remote CPU-s per warm job <= 0.15"].met
    fanout = found["fanout/pool wall <= 1.5 x (boot + 5 x local per-job)"]
    assert fanout.budget == pytest.approx(1.5 * (20 + 6.0)) and not fanout.met
    assert warm_overhead(results[2], results) == pytest.approx(0.2)
    assert warm_overhead(results[-1], results) is None  # no tiny/local
    (chain,) = speedups(results)
    assert chain.wall == pytest.approx(500 / 70, abs=1e-3) and chain.instances == 20
    assert "MISSED" in render(document({}, results, 20.0))


def test_refused_calls_are_the_limiters_not_the_injected_faults() -> None:
    """A 429 from a fault rule is the load case's own; one from the rate limits or the quota
    is a call the plugin failed to pace, and the ledger counts those apart."""
    ledger = {
        "instances": [
            {"created_at": 0.0, "running_at": 5.0, "ended_at": 50.0, "dph_total": 0.4},
            {"created_at": 4.5, "running_at": 9.5, "ended_at": 60.0, "dph_total": 0.4},
        ],
        "api_calls": {"GET /api/v1/instances/": 10},
        "ssh_bytes": {"up": 1, "down": 1},
        "rate_limited": {"GET /api/v1/instances/": 2},
        "quota_exceeded": {"POST /api/v0/bundles/": 1},
    }
    found = FakeBill.from_ledger(ledger, now=100.0)
    assert found.refused_calls == 3 and found.last_ended_at == 60.0
    assert found.teardown_seconds(55.0) == 5.0 and found.teardown_seconds(None) is None
    statuses = {"200": 20, "429": 7, "503": 1}
    assert faults_fired(statuses, FAULTS, found) == {"429": 4, "503": 1}
    assert faults_fired(None, FAULTS, found) is None


def test_partial_runs_get_their_own_results_file() -> None:
    assert result_name(parse(["--quick"])) == "quick"
    assert result_name(parse([])) == "full"
    assert (
        result_name(parse(["--only", "chain", "--modes", "pool,local"])) == "full-chain-local-pool"
    )
    assert result_name(parse(["--rtt-ms", "0"])) == "full-local-ttl0-pool"
    assert result_name(parse(["--rtt-ms", "100"])) == "full-rtt100"
    assert parse([]).rate_limits and not parse(["--no-rate-limits"]).rate_limits
    assert result_name(parse(["--no-rate-limits"])) == "full-nolimits"
    assert load_result_name(parse(["--case", "load", "--no-rate-limits"])) == "load-nolimits"
    assert parse(["--quick"]).boot_seconds == 5.0 and parse([]).boot_seconds == 5.0
    assert rerun_result_name(parse(["--case", "rerun"])) == "rerun"
    assert parse(["--case", "rerun"]).rerun_boot_seconds == 30.0
    assert rerun_result_name(parse(["--quick", "--case", "rerun"])) == "quick-rerun"
    assert rerun_result_name(parse(["--case", "rerun", "--boot-seconds", "10"])) == "rerun-boot10"
    assert pause_result_name(parse(["--case", "pause"])) == "pause"
    assert parse(["--case", "pause"]).pause_boot_seconds == 30.0
    assert pause_result_name(parse(["--quick", "--case", "pause"])) == "quick-pause"
    assert pause_result_name(parse(["--case", "pause", "--boot-seconds", "10"])) == "pause-boot10"
    assert pause_result_name(parse(["--case", "pause", "--no-rate-limits"])) == "pause-nolimits"
    names = [c.name for c in standard_cases(parse([]))]
    assert names == [
        "chain/local",
        "chain/ttl0",
        "chain/pool",
        "chain/pool-rtt50",
        "fanout/local",
        "fanout/ttl0",
        "fanout/pool",
        "tiny/local",
        "tiny/pool",
    ]


def test_the_readme_figure_is_drawn_from_the_results_files(tmp_path: Path) -> None:
    from benchmarks.plot import bars, draw, loop_bars

    standard = {
        "cases": [
            {"workflow": "chain", "jobs": 3, "mode": "local", "wall_seconds": 3.0, "dollars": 0},
            {"workflow": "chain", "jobs": 3, "mode": "pool", "wall_seconds": 9.0, "dollars": 0.01},
        ]
    }
    load = {
        "load": {"jobs": 60},
        "variants": [{"variant": "pack", "wall_seconds": 20.0, "dollars": 0.2}],
    }
    found = bars(standard, load)
    assert [(b.group, b.mode, b.dollars) for b in found] == [
        ("chain of 3", "local", None),
        ("chain of 3", "pool", 0.01),
        ("load: 60 jobs", "pack", 0.2),
    ]
    image = draw(found, tmp_path / "figure.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rerun = {
        "rerun": {"boot_seconds": 30.0},
        "modes": [
            {"mode": m, "rerun_wall_seconds": w, "rerun_first_job_seconds": f, "dollars": d}
            for m, w, f, d in (("cold", 60.0, 45.0, 0.03), ("kept", 20.0, 4.0, 0.02))
        ],
    }
    loop = loop_bars(rerun)
    assert [(b.mode, b.first_job_seconds, b.boot_seconds) for b in loop] == [
        ("cold", 45.0, 30.0),
        ("kept", 4.0, 30.0),
    ]
    image = draw(found, tmp_path / "with-loop.png", loop=loop)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
