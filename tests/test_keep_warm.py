"""Warm reuse across runs (issue 19, items 1 and 2), in real runs against the fake.

The loop people live in: run the workflow, see that the evaluation is wrong, edit it, run
again. With ``--vastai-keep-warm`` the first run leaves its idle instances up, each one's
dead-man switch holding the deadline; the rerun adopts them (no rent, no boot), and what it
cannot use, or what died meanwhile, never fails it.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.pool.ledger import Ledger
from tests.fakevast.clients import sdk
from tests.fakevast.harness import FakeVast
from tests.test_first_hour_bill import billed
from tests.workflows import (
    ANNOUNCE_START,
    assert_all_destroyed,
    helper,
    one_rule_workflow,
    reap,
    rented,
    result_files,
    run_local,
    run_snakemake,
    run_summary,
    running_snakemake,
    wait_until_running,
    write_workflow,
)

KEEP = "300"

PREPARE_TRAIN_EVALUATE = """\
localrules: all, prepare


rule all:
    input: expand("eval/{i}.txt", i=range(3))


rule prepare:
    output: "data.txt"
    shell: "echo prepared > {output}"


rule train:
    input: "data.txt"
    output: "model.txt"
    resources: gpu=1
    shell: "cat {input} > {output}"


rule evaluate:
    input: "model.txt", "scripts/evaluate.sh"
    output: "eval/{i}.txt"
    resources: gpu=1
    shell: "sh scripts/evaluate.sh {wildcards.i} > {output}"
"""


def workflow(tmp_path: Path, name: str = "wf") -> Path:
    return write_workflow(
        tmp_path / name,
        PREPARE_TRAIN_EVALUATE,
        {"scripts/evaluate.sh": 'echo "score of $1: 0.5"\n'},
    )


def edit_the_evaluation(workdir: Path) -> None:
    (workdir / "scripts" / "evaluate.sh").write_text('echo "score of $1: 0.75 (fixed)"\n')


def creates(fake: FakeVast) -> int:
    return len(rented(fake))


def keys_left(workdir: Path) -> list[str]:
    keys = workdir / ".snakemake" / "vastai" / "keys"
    return sorted(p.name for p in keys.iterdir()) if keys.is_dir() else []


def kept_records(workdir: Path) -> list:
    ledger = Ledger(workdir / ".snakemake" / "vastai")
    return [r for r in ledger.records() if r.kept_until() is not None]


@pytest.mark.slow  # a 30 s boot, as the issue asks (README: Tests)
def test_a_rerun_after_an_edit_adopts_the_kept_instances_and_rents_nothing(
    fakevast_factory, tmp_path: Path
) -> None:
    fake: FakeVast = fakevast_factory(boot_seconds=30, rate_limits=True)
    workdir = workflow(tmp_path)

    first = run_snakemake(workdir, fake, "--vastai-keep-warm", KEEP, jobs=4, timeout=300)
    assert first.ok, first.output
    assert "Kept warm for the next run in this directory until" in first.output
    rents = creates(fake)
    alive = {i["id"] for i in fake.alive_instances()}
    assert alive, "nothing was kept"
    assert {r.instance_id for r in kept_records(workdir)} == alive

    edit_the_evaluation(workdir)
    second = run_snakemake(workdir, fake, "--vastai-keep-warm", KEEP, jobs=4, timeout=300)
    assert second.ok, second.output
    assert creates(fake) == rents, "the rerun rented although kept instances could serve it"
    assert "Adopted instance" in second.output
    assert "booted in" not in second.output
    assert result_files(workdir, "eval") == local_results(tmp_path)

    print(reap(workdir, fake))
    assert_all_destroyed(fake, workdir)


def local_results(tmp_path: Path) -> dict[str, bytes]:
    """What plain local Snakemake makes of the edited workflow: the reference."""
    local = workflow(tmp_path, "local")
    edit_the_evaluation(local)
    run_local(local)
    return result_files(local, "eval")


def test_a_rerun_adopts_what_the_first_run_kept_and_rents_nothing(
    fakevast_factory, tmp_path: Path
) -> None:
    """The loop with a short boot, for the main run: kept, edited, adopted, then a run
    without the option destroys everything and the key goes with the last instance."""
    fake: FakeVast = fakevast_factory(boot_seconds=2)
    workdir = workflow(tmp_path)

    first = run_snakemake(workdir, fake, "--vastai-keep-warm", KEEP, jobs=4, timeout=300)

    assert first.ok, first.output
    assert "Kept warm for the next run in this directory until" in first.output
    assert "'snakemake-vastai reap' ends them now" in first.output
    kept = {i["id"] for i in fake.alive_instances()}
    assert kept and {r.instance_id for r in kept_records(workdir)} == kept
    assert len(keys_left(workdir)) == 2, "the key of the kept instances is gone"
    rents = len(rented(fake))

    edit_the_evaluation(workdir)
    second = run_snakemake(workdir, fake, jobs=4, timeout=300)

    assert second.ok, second.output
    assert len(rented(fake)) == rents, f"the rerun rented:\n{second.output}"
    for instance_id in kept:
        assert f"Adopted instance {instance_id} " in second.output
    assert "booted in" not in second.output
    assert result_files(workdir, "eval") == local_results(tmp_path)
    adopted = {row["instance_id"]: row for row in run_summary_of(workdir, second)["instances"]}
    assert set(adopted) == kept and all(row["boot_seconds"] == 0 for row in adopted.values())
    assert_all_destroyed(fake, workdir)
    assert keys_left(workdir) == [], "a run key outlived every instance that accepts it"


def run_summary_of(workdir: Path, run: object) -> dict:
    """The cost summary of the run whose output is ``run.output``."""
    import json

    [run_id] = re.findall(r"Vast.ai cost of run (\S+):", run.output)
    return json.loads((workdir / ".snakemake" / "vastai" / f"summary-{run_id}.json").read_text())


def test_without_the_option_nothing_is_kept(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = workflow(tmp_path)
    run = run_snakemake(workdir, fakevast, jobs=4, timeout=300)
    assert run.ok, run.output
    assert "Kept warm" not in run.output
    assert_all_destroyed(fakevast, workdir)
    assert keys_left(workdir) == []


def test_an_interrupted_run_keeps_nothing(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", f"{ANNOUNCE_START}; sleep 300; echo > {{output}}")
    with running_snakemake(workdir, fakevast, "--vastai-keep-warm", KEEP, jobs=1) as run:
        wait_until_running(fakevast, workdir, run)
        run.send_signal(signal.SIGINT)
        run.wait(timeout=120)
    output = (workdir / "snakemake.out").read_text()
    assert "Kept warm" not in output, output
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow  # waits out a keep-warm deadline (README: Tests)
def test_a_kept_instance_ends_itself_at_its_deadline_when_nobody_returns(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    keep, deadman = 20, 10
    workdir = one_rule_workflow(tmp_path / "wf", "echo trained > {output}")
    run = run_snakemake(
        workdir, fakevast, "--vastai-keep-warm", str(keep), "--vastai-deadman", str(deadman)
    )
    assert run.ok, run.output
    assert len(fakevast.alive_instances()) == 1
    [record] = kept_records(workdir)
    deadline = record.kept_until()

    fakevast.wait_for(lambda: not fakevast.alive_instances(), timeout=keep + 40, interval=1)

    [row] = rented(fakevast)
    assert row["destroyed_by"] == "container", row  # its own switch, nobody else
    assert row["ended_at"] >= deadline - 2, "it was ended before the promised deadline"
    # The promise of the last lines: what it cost in the run, plus at most the kept time.
    most = float(re.search(r"they cost at most \$([0-9.]+) more", run.output).group(1))
    in_run = run_summary(workdir)["totals"]["dollars"]
    assert billed(row) <= in_run + most + 0.0001, (billed(row), in_run, most)


LONG_ON_REQUEST = f"""\
rule work:
    output: "out.txt"
    resources: gpu=1
    shell: "if [ {{config[long]}} = 1 ]; then {ANNOUNCE_START}; sleep 300; fi; echo > {{output}}"
"""


@pytest.mark.slow  # waits for a dead-man switch (README: Tests)
def test_a_killed_rerun_leaves_nothing_alive_once_the_switch_fires(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    deadman = ("--vastai-deadman", "10")
    workdir = write_workflow(tmp_path / "wf", LONG_ON_REQUEST)
    first = run_snakemake(
        workdir, fakevast, "--vastai-keep-warm", KEEP, *deadman, "--config", "long=0"
    )
    assert first.ok, first.output
    [kept] = [i["id"] for i in fakevast.alive_instances()]
    (workdir / "out.txt").unlink()

    extra = (*deadman, "--config", "long=1")
    with running_snakemake(workdir, fakevast, "--vastai-keep-warm", KEEP, *extra, jobs=1) as run:
        assert wait_until_running(fakevast, workdir, run) == kept  # adopted, not rented
        run.kill()  # SIGKILL: no teardown; nobody comes back
        run.wait(timeout=30)

    # Its keep-warm deadline (300 s) was handed back to the heartbeat when the rerun took it
    # over: the switch ends it once the heartbeat is 10 s stale, not 300 s later.
    fakevast.wait_for(lambda: not fakevast.alive_instances(), timeout=10 + 30, interval=1)
    [row] = rented(fakevast)
    assert row["destroyed_by"] == "container", row


@pytest.mark.slow  # two or three real runs (README: Tests)
@pytest.mark.parametrize("fate", ["destroyed", "outbid"])
def test_a_kept_instance_that_died_meanwhile_is_forgotten_and_the_rerun_rents_fresh(
    fakevast: FakeVast, tmp_path: Path, fate: str
) -> None:
    workdir = workflow(tmp_path)
    first = run_snakemake(workdir, fakevast, "--vastai-keep-warm", KEEP, jobs=4, timeout=300)
    assert first.ok, first.output
    kept = [i["id"] for i in fakevast.alive_instances()]
    for instance_id in kept:
        if fate == "destroyed":  # by the user in the console, say
            sdk(fakevast).destroy_instance(id=instance_id)
        else:
            fakevast.set_faults({"instances": {str(i): {"stopped": True} for i in kept}})
    rents = len(rented(fakevast))

    edit_the_evaluation(workdir)
    second = run_snakemake(workdir, fakevast, jobs=4, timeout=300)

    assert second.ok, second.output
    assert "Adopted instance" not in second.output
    assert len(rented(fakevast)) > rents
    assert "Traceback" not in second.output and "ERROR" not in second.output
    assert result_files(workdir, "eval") == local_results(tmp_path)
    assert_all_destroyed(fakevast, workdir)
    assert keys_left(workdir) == []


@pytest.mark.slow  # two or three real runs (README: Tests)
def test_two_workflow_directories_never_adopt_each_others_instances(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    mine, theirs = workflow(tmp_path, "mine"), workflow(tmp_path, "theirs")
    for workdir in (mine, theirs):
        run = run_snakemake(workdir, fakevast, "--vastai-keep-warm", KEEP, jobs=4, timeout=300)
        assert run.ok, run.output
    their_kept = {r.instance_id for r in kept_records(theirs)}
    assert their_kept and their_kept <= {i["id"] for i in fakevast.alive_instances()}

    edit_the_evaluation(mine)
    rerun = run_snakemake(mine, fakevast, jobs=4, timeout=300)

    assert rerun.ok, rerun.output
    assert "Adopted instance" in rerun.output
    for instance_id in their_kept:
        assert str(instance_id) not in rerun.output
    assert {i["id"] for i in fakevast.alive_instances()} == their_kept  # theirs, still kept
    status = helper(theirs, fakevast, "status")
    assert "kept warm until" in status and "kept warm for the next run" in status, status
    assert "Destroyed instance" in reap(theirs, fakevast)
    assert not fakevast.alive_instances()
