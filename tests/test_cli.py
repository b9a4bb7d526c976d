"""cli.py (``snakemake-vastai``) run as the user runs it, a subprocess against the fake: it reads
the key and URL from the plugin's own sources, status tells running runs from ended ones and
says what to reap, reap destroys only what is ours and orphaned, looking changes nothing, cost is
rebuilt from the ledger alone, and every error is one line on stderr."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from freezegun import freeze_time

from snakemake_executor_plugin_vastai.cli.commands import parser
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, RunLock, make_label, run_id_of
from tests.fakevast.harness import FakeVast
from tests.instances import is_running, market_for, rent, wait_for
from tests.notvast import not_vast, unused_port

HELPER = str(Path(sys.executable).with_name("snakemake-vastai"))
RUNS = {"alive": "run-alive", "dead": "run-dead", "unknown": "run-elsewhere"}
GONE_ID = 21999999  # a rent of the dead run, destroyed long ago


@dataclass
class Result:
    code: int
    out: str
    err: str


def helper(home: Path, *args: str, env: Mapping[str, str] | None = None) -> Result:
    """``snakemake-vastai args`` with only ``env``'s Vast.ai settings and a HOME of its own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "SNAKEMAKE_"))}
    clean |= {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    done = subprocess.run(
        [HELPER, *args], env=clean | dict(env or {}), capture_output=True, text=True, timeout=300
    )
    return Result(done.returncode, done.stdout, done.stderr)


def plugin_env(fake: FakeVast) -> dict[str, str]:
    """The plugin's own variables: what the issue measured the helper refusing."""
    return {"SNAKEMAKE_VASTAI_API_KEY": fake.api_key, "SNAKEMAKE_VASTAI_API_URL": fake.url}


def assert_one_line_error(result: Result, message: str, code: int = 1) -> None:
    assert (result.code, result.out, result.err) == (code, "", f"snakemake-vastai: {message}\n")


def alive_ids(fake: FakeVast) -> set[int]:
    return {row["id"] for row in fake.alive_instances()}


def table_rows(out: str) -> dict[str, list[str]]:
    """The status table's rows by label (its last cell)."""
    return {
        line.split()[-1]: line.split() for line in out.splitlines() if "snakemake-vastai:" in line
    }


def files_below(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """No ~/.vast_api_key or ~/.config/vastai to fall back on, unless a test writes one."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@dataclass
class Fleet:
    """Instances of a live run, a dead run, a run this workdir never saw, and one not ours."""

    fake: FakeVast
    workdir: Path
    ids: dict[str, int]
    labels: dict[str, str]

    @property
    def state_dir(self) -> Path:
        return self.workdir / ".snakemake" / "vastai"


@pytest.fixture
def fleet(fakevast: FakeVast, tmp_path: Path) -> Iterator[Fleet]:
    workdir = tmp_path / "wf"
    state_dir = workdir / ".snakemake" / "vastai"
    ledger = Ledger(state_dir)
    live = RunLock(state_dir, RUNS["alive"])  # held by this process for the whole test
    RunLock(state_dir, RUNS["dead"]).release()  # its process is gone: the lock is free
    labels = {name: make_label(run, name) for name, run in RUNS.items()}
    labels["foreign"] = "my-jupyter-box"
    finished = make_label(RUNS["dead"], "finished")
    ledger.rent_requested(finished, RUNS["dead"], 0, 0.25)
    ledger.rented(finished, GONE_ID)
    ledger.job_ran(finished, "rule a")
    ledger.destroyed(finished)
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
        for instance_id in ids.values():
            wait_for(market, instance_id, is_running)
        labels["finished"] = finished
        yield Fleet(fakevast, workdir, ids, labels)
    finally:
        live.release()
        for instance_id in ids.values():
            market.destroy(instance_id)  # already gone is fine


# -- status -----------------------------------------------------------------------------------


def test_status_shows_each_run_its_instances_and_what_to_reap(fleet: Fleet, home: Path) -> None:
    result = helper(home, "--workdir", str(fleet.workdir), "status", env=plugin_env(fleet.fake))

    assert (result.code, result.err) == (0, ""), result
    rows = table_rows(result.out)
    ids, labels = fleet.ids, fleet.labels
    assert [row[:4] for row in rows.values()] == [  # runs in the order they first rented
        ["run-dead", "killed", str(GONE_ID), "gone"],  # its lock is free; it wrote no summary
        ["run-dead", "killed", str(ids["dead"]), "running"],
        ["run-alive", "running", str(ids["alive"]), "running"],
        ["run-elsewhere", "unknown", str(ids["unknown"]), "running"],
    ]
    assert list(rows) == [labels[n] for n in ("finished", "dead", "alive", "unknown")]
    assert rows[labels["finished"]][4:6] == ["0.250", "1"]  # $/h and jobs from the ledger
    assert "jupyter" not in result.out and str(ids["foreign"]) not in result.out
    assert result.out.splitlines()[-1] == (
        "1 instance of a dead run is still on Vast.ai and billing: run "
        f"'snakemake-vastai --workdir {fleet.workdir} reap' to destroy it."
    )
    assert "unknown: a run this workdir never recorded" in result.out


def test_status_of_a_workdir_without_runs(fakevast: FakeVast, tmp_path: Path, home: Path) -> None:
    workdir = tmp_path / "wf"
    workdir.mkdir()
    result = helper(home, "--workdir", str(workdir), "status", env=plugin_env(fakevast))
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        f"No runs recorded in {workdir}/.snakemake/vastai, and no instance with the plugin's "
        "label.\n"
    )


def test_looking_leaves_a_workdir_as_it_was(fleet: Fleet, tmp_path: Path, home: Path) -> None:
    """status, cost and both dry runs neither write nor make a folder, in a workdir with
    runs or without."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    before = files_below(fleet.workdir)
    env = plugin_env(fleet.fake)
    for workdir in (fleet.workdir, fresh):
        for command in (
            ["status"],
            ["cost"],
            ["reap", "--dry-run"],
            ["reap", "--all", "--dry-run"],
        ):
            result = helper(home, "--workdir", str(workdir), *command, env=env)
            assert (result.code, result.err) == (0, ""), (command, result)
    assert list(fresh.iterdir()) == []
    assert files_below(fleet.workdir) == before
    assert alive_ids(fleet.fake) == set(fleet.ids.values()), "a dry run destroys nothing"


# -- reap -------------------------------------------------------------------------------------


def test_reap_dry_run_then_reap(fleet: Fleet, home: Path) -> None:
    env = plugin_env(fleet.fake)
    orphan, label = fleet.ids["dead"], fleet.labels["dead"]
    reap = ["--workdir", str(fleet.workdir), "reap"]

    dry = helper(home, *reap, "--dry-run", env=env)
    assert (dry.code, dry.out, dry.err) == (0, f"Would destroy instance {orphan} ({label})\n", "")

    done = helper(home, *reap, env=env)
    assert (done.code, done.out, done.err) == (0, f"Destroyed instance {orphan} ({label})\n", "")
    assert alive_ids(fleet.fake) == set(fleet.ids.values()) - {orphan}
    open_labels = {r.label for r in Ledger(fleet.state_dir).open_records()}
    assert open_labels == {fleet.labels["alive"]}

    again = helper(home, *reap, env=env)
    assert (again.code, again.out) == (0, "Nothing to reap.\n")
    status = helper(home, "--workdir", str(fleet.workdir), "status", env=env)
    assert table_rows(status.out)[label][:4] == ["run-dead", "killed", str(orphan), "gone"]
    assert "reap' to destroy" not in status.out


def test_reap_all_spares_only_unlabelled_instances(fleet: Fleet, home: Path) -> None:
    result = helper(
        home, "--workdir", str(fleet.workdir), "reap", "--all", env=plugin_env(fleet.fake)
    )
    assert (result.code, result.err) == (0, "")
    for name in RUNS:
        assert f"Destroyed instance {fleet.ids[name]} ({fleet.labels[name]})" in result.out
    assert alive_ids(fleet.fake) == {fleet.ids["foreign"]}
    assert Ledger(fleet.state_dir).open_records() == []


# -- the key and the URL: the plugin's sources, in the plugin's order --------------------------


KEY_SOURCES = ["--api-key", "SNAKEMAKE_VASTAI_API_KEY", "VAST_API_KEY", "key file"]
URL_SOURCES = ["--api-url", "SNAKEMAKE_VASTAI_API_URL", "VAST_URL"]


@pytest.mark.parametrize(
    ("key_source", "url_source"),
    [(k, URL_SOURCES[i % len(URL_SOURCES)]) for i, k in enumerate(KEY_SOURCES)],
)
def test_key_and_url_come_from_the_plugins_sources_in_its_order(
    fakevast: FakeVast, tmp_path: Path, home: Path, key_source: str, url_source: str
) -> None:
    """The winning source holds the right value; every source below it a wrong one."""
    dead_end = f"http://127.0.0.1:{unused_port()}"
    args, env = [], {}
    for source in KEY_SOURCES[KEY_SOURCES.index(key_source) :]:
        key = fakevast.api_key if source == key_source else "wrong-key"
        if source == "--api-key":
            args += [source, key]
        elif source == "key file":
            (home / ".config" / "vastai").mkdir(parents=True)
            (home / ".config" / "vastai" / "vast_api_key").write_text(key + "\n")
        else:
            env[source] = key
    for source in URL_SOURCES[URL_SOURCES.index(url_source) :]:
        url = fakevast.url if source == url_source else dead_end
        if source == "--api-url":
            args += [source, url]
        else:
            env[source] = url
    workdir = tmp_path / "wf"
    workdir.mkdir()

    result = helper(home, *args, "--workdir", str(workdir), "status", env=env)

    assert (result.code, result.err) == (0, ""), result
    assert "No runs recorded" in result.out


# -- errors: one line on stderr, naming the helper's own flags --------------------------------


def test_a_rejected_key_says_so_once_and_where_it_came_from(fakevast: FakeVast, home: Path) -> None:
    env = plugin_env(fakevast) | {"SNAKEMAKE_VASTAI_API_KEY": "not-the-key-31337"}
    result = helper(home, "status", env=env)
    assert_one_line_error(
        result,
        "Vast.ai rejected the API key from SNAKEMAKE_VASTAI_API_KEY (HTTP 401). Check that "
        "key, or pass another with --api-key.",
    )
    assert fakevast.ledger()["api_calls"] == {"GET /api/v0/users/current/": 1}


def test_a_missing_key_names_the_helpers_flag(home: Path) -> None:
    assert_one_line_error(
        helper(home, "reap", "--dry-run"),
        "No Vast.ai API key found. Pass --api-key, or set SNAKEMAKE_VASTAI_API_KEY or "
        "VAST_API_KEY, or run 'vastai set api-key <key>'.",
    )


@pytest.mark.slow
def test_an_unreachable_url_names_the_network_and_the_url(home: Path) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    assert_one_line_error(
        helper(home, "--api-url", url, "--api-key", "some-key", "status"),
        f"Cannot reach the Vast.ai API at {url}: connection refused. Check the network, or "
        "--api-url / VAST_URL.",
    )


def test_a_url_that_is_not_the_vast_api_says_so(home: Path) -> None:
    with not_vast(status=404) as server:
        result = helper(home, "status", env={"VAST_URL": server.url, "VAST_API_KEY": "some-key"})
    assert_one_line_error(
        result,
        f"The Vast.ai API at {server.url} sent an answer that cannot be read: HTTP 404 for the "
        f"user account. Is {server.url} the Vast.ai API? Check --api-url / VAST_URL.",
    )
    assert server.requests == ["GET /api/v0/users/current"]


def test_a_url_without_http_is_refused(home: Path) -> None:
    assert_one_line_error(
        helper(home, "--api-url", "console.vast.ai", "--api-key", "k", "reap"),
        "The Vast.ai API URL 'console.vast.ai' is not an http:// or https:// URL with a host. "
        "Check --api-url / VAST_URL.",
    )


@pytest.mark.parametrize("command", [["status"], ["reap", "--dry-run"], ["reap"], ["cost"]])
def test_a_missing_workdir_is_named(tmp_path: Path, home: Path, command: list[str]) -> None:
    missing = tmp_path / "no-such-dir"
    assert_one_line_error(
        helper(home, "--workdir", str(missing), *command), f"--workdir {missing} does not exist."
    )
    assert not missing.exists()


def test_a_usage_mistake_is_one_line(home: Path) -> None:
    result = helper(home, "statos")
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith("snakemake-vastai: argument COMMAND: invalid choice: 'statos'")
    assert result.err.endswith("(see snakemake-vastai --help)\n") and result.err.count("\n") == 1


# -- help -------------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    actions = parser()._subparsers._group_actions  # type: ignore[union-attr]
    return next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", [[], *[[name] for name in subcommands()]], ids=str)
def test_help_is_plain_text(home: Path, command: list[str]) -> None:
    result = helper(home, *command, "--help")
    assert (result.code, result.err) == (0, "")
    assert not re.search(r"`|\*\*|:\w+:", result.out), result.out  # no rST or Markdown
    if command:
        description = subcommands()[command[0]].description
        assert description and " ".join(description.split()) in " ".join(result.out.split())
    else:
        for name in subcommands():  # every command listed with a summary
            assert re.search(rf"^\s+{name}\s+\w", result.out, re.MULTILINE), name


# -- cost -------------------------------------------------------------------------------------


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(1_700_000_000 + seconds, tz=UTC)


def test_cost_prints_per_run_totals(tmp_path: Path, home: Path) -> None:
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
        ledger.data_billed("snakemake-vastai:r1:a", 0.04)  # its bandwidth: bytes at $/GB
        ledger.destroyed("snakemake-vastai:r1:a")  # 100 s at $3.60/h = $0.10
        ledger.destroyed("snakemake-vastai:r1:b")  # 100 s at $1.80/h = $0.05

    result = helper(home, "--workdir", str(tmp_path), "cost")

    assert (result.code, result.err) == (0, "")
    rows = {line.split()[0]: line.split()[1:] for line in result.out.splitlines()}
    assert rows["r1"] == ["2", "3", "0", "0.0400", "0.1900"]  # instances, jobs, open, data, $
    assert rows["r2"][:4] == ["1", "0", "1", "0.0000"]  # still open: billed up to now, so...
    assert float(rows["r2"][4]) > 0.60  # ...at least the 300 s at $7.20/h of the frozen timeline
    assert float(rows["total"][0]) == pytest.approx(0.19 + float(rows["r2"][4]), abs=1e-4)


def test_cost_counts_each_instance_from_its_create_as_the_bill_does(
    tmp_path: Path, home: Path
) -> None:
    """Under the create interval a rent's request may wait 4.5 s for its turn; Vast.ai bills
    from the create. A create whose answer was lost counts from its request (the most it
    can have cost)."""
    ledger = Ledger(tmp_path / ".snakemake" / "vastai")
    with freeze_time(at(0)):
        ledger.rent_requested("snakemake-vastai:r1:a", "r1", 1, 3.6)
    with freeze_time(at(4.5)):  # the create's turn came, and its answer
        ledger.rented("snakemake-vastai:r1:a", 11)
    with freeze_time(at(104.5)):
        ledger.destroyed("snakemake-vastai:r1:a")

    result = helper(home, "--workdir", str(tmp_path), "cost")

    assert (result.code, result.err) == (0, "")
    rows = {line.split()[0]: line.split()[1:] for line in result.out.splitlines()}
    assert rows["r1"][4] == "0.1000"  # 100 s at $3.60/h, not 104.5 s ($0.1045)
    [record] = Ledger(tmp_path / ".snakemake" / "vastai").records()
    record.created_at = None  # as if the create's answer never came
    assert record.cost(now=0) == pytest.approx(0.1045)


def test_cost_without_a_ledger(tmp_path: Path, home: Path) -> None:
    result = helper(home, "--workdir", str(tmp_path), "cost")
    assert (result.code, result.err) == (0, "")
    assert result.out == f"No runs recorded in {tmp_path}/.snakemake/vastai.\n"
