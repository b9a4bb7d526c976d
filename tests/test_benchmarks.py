"""The benchmark machinery on a tiny case, and its target arithmetic on made-up numbers.

Why: ``python -m benchmarks`` takes minutes, so its parts are checked here in seconds: one
real two-job chain through the warm pool against the fake (ledger, summary, probes), and the
targets and ratios the results file reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.__main__ import parse, result_name
from benchmarks.measure import Case, CaseResult, FakeBill, run_case
from benchmarks.report import document, render, speedups, targets
from benchmarks.workflows import Workflow


def test_chain_in_the_pool_is_measured(tmp_path: Path) -> None:
    result = run_case(Case(Workflow("chain", 2, 1), "pool", 0.0), tmp_path / "case")

    output = tmp_path / "case" / "workflow" / "chain" / "2.txt"
    assert output.read_text() == "seed\n1\n2\n"
    assert result.bill is not None and result.bill.nothing_left_running
    assert result.bill.instances == 1
    assert result.bill.billed_instance_seconds > 0 and result.bill.dollars > 0
    assert result.bill.api_calls["PUT /api/v0/asks/{id}/"] == 1
    assert result.plugin_summary is not None and result.plugin_summary["jobs_run"] == 2
    assert result.phases is not None
    assert result.phases["cold"]["jobs"] == 1 and result.phases["warm"]["jobs"] == 1
    assert "schedule" in result.phases["cold"]["mean"]
    assert "chain/pool" in render(document({}, [result], 0.0))


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
    )


def test_targets_and_speedups_from_results() -> None:
    results = [
        CaseResult("chain", "local", 20, 1, 24.0, None, None, None),
        CaseResult("chain", "ttl0", 20, 1, 500.0, bill(20, 480.0, 120, 400.0), None, None),
        CaseResult(
            "chain", "pool", 20, 1, 70.0, bill(1, 68.0, 30, 20.0), {"busy_seconds": 40.0}, None
        ),
        CaseResult("fanout", "pool", 40, 8, 40.0, bill(9, 200.0, 160, 160.0), None, None),
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
    (chain,) = speedups(results)
    assert chain.wall == pytest.approx(500 / 70, abs=1e-3) and chain.instances == 20


def test_partial_runs_get_their_own_results_file() -> None:
    assert result_name(parse(["--quick"])) == "quick"
    assert result_name(parse([])) == "full"
    assert (
        result_name(parse(["--only", "chain", "--modes", "pool,local"])) == "full-chain-local-pool"
    )
    assert parse(["--quick"]).boot_seconds == 5.0 and parse([]).boot_seconds == 20.0
