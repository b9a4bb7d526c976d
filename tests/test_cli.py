"""cli.py (``snakemake-vastai``) against the fake: status tells live runs from dead ones,
reap destroys only what is ours and orphaned, and cost is rebuilt from the ledger alone."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from freezegun import freeze_time

from snakemake_executor_plugin_vastai.cli import main
from snakemake_executor_plugin_vastai.ledger import Ledger, RunLock, make_label, run_id_of
from tests.fakevast.harness import FakeVast
from tests.instances import market_for, rent

RUNS = {"alive": "run-alive", "dead": "run-dead", "unknown": "run-elsewhere"}


def cli(fake: FakeVast, workdir: Path, *args: str, key: str | None = None) -> int:
    api = ["--api-url", fake.url, "--api-key", key or fake.api_key]
    return main([*api, "--workdir", str(workdir), *args])


def alive_ids(fake: FakeVast) -> set[int]:
    return {row["id"] for row in fake.alive_instances()}


@dataclass
class Fleet:
    """Instances of a live run, a dead run, a run this workdir never saw, and one not ours."""

    fake: FakeVast
    workdir: Path
    ids: dict[str, int]
    labels: dict[str, str]

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.workdir / ".snakemake" / "vastai")


@pytest.fixture
def fleet(fakevast: FakeVast, tmp_path: Path) -> Iterator[Fleet]:
    state_dir = tmp_path / ".snakemake" / "vastai"
    ledger = Ledger(state_dir)
    live = RunLock(state_dir, RUNS["alive"])  # held by this process for the whole test
    RunLock(state_dir, RUNS["dead"]).release()  # its process is gone: the lock is free
    labels = {name: make_label(run, name) for name, run in RUNS.items()}
    labels["foreign"] = "my-jupyter-box"
    market = market_for(fakevast)
    ids: dict[str, int] = {}
    try:
        for name, label in labels.items():
            run_id = run_id_of(label)
            if run_id is not None and name != "unknown":
                ledger.rent_requested(label, run_id, 0, 0.1)
            ids[name] = rent(market, label)
            if run_id is not None and name != "unknown":
                ledger.rented(label, ids[name])
        yield Fleet(fakevast, tmp_path, ids, labels)
    finally:
        live.release()
        for instance_id in ids.values():
            market.destroy(instance_id)  # already gone is fine


def test_status_lists_our_instances_and_whether_their_run_lives(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(fleet.fake, fleet.workdir, "status") == 0
    out = capsys.readouterr().out
    for name, expected in [("alive", "alive"), ("dead", "dead"), ("unknown", "alive")]:
        pattern = rf"^\s*{fleet.ids[name]}\s.*\s{expected}\s+{re.escape(fleet.labels[name])}$"
        assert re.search(pattern, out, re.MULTILINE), f"{name}:\n{out}"
    assert str(fleet.ids["foreign"]) not in out and "jupyter" not in out


def test_reap_dry_run_then_reap(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    orphan, label = fleet.ids["dead"], fleet.labels["dead"]
    assert cli(fleet.fake, fleet.workdir, "reap", "--dry-run") == 0
    assert capsys.readouterr().out == f"Would destroy instance {orphan} ({label})\n"
    assert alive_ids(fleet.fake) == set(fleet.ids.values()), "a dry run destroys nothing"

    assert cli(fleet.fake, fleet.workdir, "reap") == 0
    assert capsys.readouterr().out == f"Destroyed instance {orphan} ({label})\n"
    assert alive_ids(fleet.fake) == set(fleet.ids.values()) - {orphan}
    assert {r.label for r in fleet.ledger.open_records()} == {fleet.labels["alive"]}

    assert cli(fleet.fake, fleet.workdir, "reap") == 0
    assert capsys.readouterr().out == "Nothing to reap.\n"


def test_reap_all_spares_only_unlabelled_instances(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(fleet.fake, fleet.workdir, "reap", "--all") == 0
    out = capsys.readouterr().out
    for name in RUNS:
        assert f"Destroyed instance {fleet.ids[name]} ({fleet.labels[name]})" in out
    assert alive_ids(fleet.fake) == {fleet.ids["foreign"]}
    assert fleet.ledger.open_records() == []


def test_status_with_nothing_of_ours(
    fakevast: FakeVast, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(fakevast, tmp_path, "status") == 0
    assert "No instance with the snakemake-vastai label" in capsys.readouterr().out


def test_rejected_key_exits_1_without_showing_it(
    fakevast: FakeVast, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "not-the-key-31337"
    assert cli(fakevast, tmp_path, "status", key=key) == 1
    err = capsys.readouterr().err
    assert "rejected the API key" in err and key not in err


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(1_700_000_000 + seconds, tz=UTC)


def test_cost_prints_per_run_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = Ledger(tmp_path / ".snakemake" / "vastai")
    with freeze_time(at(0)):
        ledger.rent_requested("snakemake-vastai:r1:a", "r1", 1, 3.6)
        ledger.rented("snakemake-vastai:r1:a", 11)
        ledger.rent_requested("snakemake-vastai:r1:b", "r1", 2, 1.8)
        ledger.rented("snakemake-vastai:r1:b", 12)
        ledger.rent_requested("snakemake-vastai:r2:c", "r2", 3, 7.2)
        ledger.rent_requested("snakemake-vastai:r2:never", "r2", 4, 99.0)  # create failed
        ledger.rented("snakemake-vastai:r2:c", 13)
        ledger.job_ran("snakemake-vastai:r1:a", "rule a")
        ledger.job_ran("snakemake-vastai:r1:b", "rule b")
        ledger.job_ran("snakemake-vastai:r1:b", "rule c")
    with freeze_time(at(100)):
        ledger.destroyed("snakemake-vastai:r1:a")  # 100 s at $3.60/h = $0.10
        ledger.destroyed("snakemake-vastai:r1:b")  # 100 s at $1.80/h = $0.05
    with freeze_time(at(300)):  # r2:c still open: 300 s at $7.20/h = $0.60
        assert main(["--workdir", str(tmp_path), "cost"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["r1"] == ["2", "3", "0", "0.1500"]  # instances, jobs, open, dollars
    assert rows["r2"] == ["1", "0", "1", "0.6000"]
    assert rows["total"] == ["0.7500"]


def test_cost_without_a_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workdir", str(tmp_path), "cost"]) == 0
    assert "No runs recorded" in capsys.readouterr().out
