"""The warm pool seen from outside: real ``snakemake --executor vastai`` runs against the fake
marketplace, judged by the fake's ledger (what was really rented and destroyed, when), the
plugin's cost summary, and tokens the jobs read on their instance.

Why the instance token: the plugin's own records could be wrong in the same way as its
decisions; a file in the instance's home, made by the first job there and read by every later
one, tells from the instance's side which jobs shared it.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.pool.ledger import Ledger
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    INSTANCE_TOKEN,
    SnakemakeRun,
    assert_all_destroyed,
    job_errors,
    run_snakemake,
    run_summary,
    running_snakemake,
    wait_until_running,
    write_workflow,
)

TOKEN = f"TOKEN = {INSTANCE_TOKEN!r}\n\n"


@dataclass
class Finished:
    """A completed snakemake run and what the fake saw of it."""

    run: SnakemakeRun
    workdir: Path
    instances: list[dict[str, Any]]  # the fake's ledger rows, in creation order
    alive: list[dict[str, Any]]  # still running in the fake after snakemake exited
    exited_at: float  # wall clock, comparable with the fake's timestamps
    seconds: float

    def text(self, path: str) -> str:
        return (self.workdir / path).read_text()

    def tokens(self, *paths: str) -> list[str]:
        return tokens(self.workdir, *paths)


def tokens(workdir: Path, *paths: str) -> list[str]:
    """The instance token each output carries (its last word): equal tokens, same instance."""
    return [(workdir / path).read_text().split()[-1] for path in paths]


def finish(workdir: Path, fake: FakeVast, *extra: str, jobs: int = 2) -> Finished:
    started = time.time()
    run = run_snakemake(workdir, fake, *extra, jobs=jobs, timeout=240)
    exited = time.time()
    instances = fake.ledger()["instances"]
    alive = fake.alive_instances()
    return Finished(run, workdir, instances, alive, exited, exited - started)


def most_at_once(instances: list[dict[str, Any]]) -> int:
    """The most instances alive at the same moment, from the fake's create/end times."""
    events = sorted(
        [(row["created_at"], 1) for row in instances]
        + [(row["ended_at"] or float("inf"), -1) for row in instances]
    )
    alive = peak = 0
    for _, change in events:
        alive += change
        peak = max(peak, alive)
    return peak


# -- a chain of five dependent jobs: reuse, look-ahead, the cost summary ------------------

CHAIN = """\
localrules: all, stamp


rule all:
    input: "stamp.txt"


# Local, after the last remote job: a time stamp a second into the rest of the run.
rule stamp:
    input: "out/5.txt"
    output: "stamp.txt"
    shell: "sleep 1; date +%s.%N > {output}"


rule first:
    output: "out/1.txt"
    shell: "sleep 1; echo 1 > {output}"


rule step:
    input: lambda w: f"out/{int(w.n) - 1}.txt"
    output: "out/{n}.txt"
    wildcard_constraints: n="[2-5]"
    shell: "sleep 1; cat {input} > {output}; echo {wildcards.n} >> {output}"
"""
CHAIN_RENTS = {300: 1, 0: 5}  # --vastai-pool-ttl -> instances rented for the five jobs


@dataclass
class Chain:
    ttl: int
    done: Finished

    @property
    def rents(self) -> int:
        return CHAIN_RENTS[self.ttl]


@pytest.fixture(
    scope="module",
    params=[300, pytest.param(0, marks=pytest.mark.slow)],
    ids=lambda ttl: f"ttl{ttl}",
)
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """One run of the chain per TTL, shared by the tests that read it (each run is ~20 s)."""
    ttl = request.param
    workdir = write_workflow(tmp_path_factory.mktemp(f"chain-ttl{ttl}") / "wf", CHAIN)
    with FakeVast(boot_seconds=0, rate_limits=False) as fake:
        return Chain(ttl, finish(workdir, fake, "--vastai-pool-ttl", str(ttl)))


def test_chain_rents_once_with_a_ttl_and_once_per_job_without(chain: Chain) -> None:
    """Five 1-second jobs in a row: with a TTL each job finds the previous one's instance
    idle; with TTL 0 every job rents and boots its own."""
    done = chain.done
    assert done.run.ok, done.run.output
    assert done.text("out/5.txt") == "1\n2\n3\n4\n5\n"
    assert len(done.instances) == chain.rents
    assert done.alive == []
    assert [row["status"] for row in done.instances] == ["destroyed"] * chain.rents
    assert Ledger(done.workdir / ".snakemake" / "vastai").open_records() == []


@pytest.mark.parametrize("chain", [300], indirect=True, ids=["ttl300"])
def test_look_ahead_destroys_the_last_instance_with_the_last_job(chain: Chain) -> None:
    """With a 300 s TTL, the instance goes as soon as no remaining job can use it: while
    the local rule after the last remote job runs, not when the run ends (teardown) or the
    TTL runs out; and snakemake exits promptly."""
    done = chain.done
    assert done.run.ok, done.run.output
    [instance] = done.instances
    assert instance["ended_at"] is not None
    assert instance["ended_at"] <= float(done.text("stamp.txt")) < done.exited_at
    assert "no job still to run can use it" in done.run.output


def test_cost_summary_totals(chain: Chain) -> None:
    """The JSON summary agrees with the fake: the same instances, every job counted once,
    a boot avoided for every job beyond the first on an instance."""
    done = chain.done
    summary = run_summary(done.workdir)
    totals = summary["totals"]
    assert totals["jobs_run"] == 5
    assert totals["instances"] == chain.rents
    assert totals["boots_avoided"] == 5 - chain.rents
    listed = summary["instances"]
    assert [i["instance_id"] for i in listed] == [row["id"] for row in done.instances]
    assert sum(i["jobs_run"] for i in listed) == 5
    assert all(i["dollars"] > 0 for i in listed)
    assert totals["dollars"] == pytest.approx(sum(i["dollars"] for i in listed), abs=1e-6)


# -- fan-out and signatures ---------------------------------------------------------------

FAN_OUT = (
    TOKEN
    + """\
rule all:
    input: expand("fan/{i}.txt", i=range(6))


rule fan:
    output: "fan/{i}.txt"
    shell: "sleep 1; " + TOKEN + " > {output}"
"""
)


def test_fan_out_rents_at_most_jobs_instances(fakevast: FakeVast, tmp_path: Path) -> None:
    """Six independent jobs, --jobs 3: the pool defaults to 3 instances, the second wave
    runs on the first wave's."""
    done = finish(write_workflow(tmp_path / "wf", FAN_OUT), fakevast, jobs=3)
    assert done.run.ok, done.run.output
    assert 1 <= len(done.instances) <= 3
    assert most_at_once(done.instances) <= 3
    tokens = done.tokens(*(f"fan/{i}.txt" for i in range(6)))
    assert len(set(tokens)) == len(done.instances)
    assert run_summary(done.workdir)["totals"]["jobs_run"] == 6
    assert_all_destroyed(fakevast, done.workdir)


# a1 -> b1 -> a2 -> b2, alternating GPU models: a2 and b2 each find an idle instance of
# the other model and one of their own.
TWO_SIGNATURES = (
    TOKEN
    + """\
rule all:
    input: "b2.txt"


rule a1:
    output: "a1.txt"
    resources: gpu_model="RTX_4090"
    shell: TOKEN + " > {output}"


rule b1:
    input: "a1.txt"
    output: "b1.txt"
    resources: gpu_model="RTX_A6000"
    shell: TOKEN + " > {output}"


rule a2:
    input: "b1.txt"
    output: "a2.txt"
    resources: gpu_model="RTX_4090"
    shell: TOKEN + " > {output}"


rule b2:
    input: "a2.txt"
    output: "b2.txt"
    resources: gpu_model="RTX_A6000"
    shell: TOKEN + " > {output}"
"""
)


@pytest.mark.slow
def test_two_signatures_never_share_an_instance(fakevast: FakeVast, tmp_path: Path) -> None:
    """Pool of 2 (--jobs 2): every job finds the other model's instance idle and must not
    take it. Checked three ways: the instances' tokens, the GPUs the fake rented, and the
    plugin's ledger of which job ran where."""
    done = finish(write_workflow(tmp_path / "wf", TWO_SIGNATURES), fakevast, jobs=2)
    assert done.run.ok, done.run.output
    a1, b1, a2, b2 = done.tokens("a1.txt", "b1.txt", "a2.txt", "b2.txt")
    assert a1 == a2 and b1 == b2 and a1 != b1  # seen from the instances
    assert sorted(row["gpu_name"] for row in done.instances) == ["RTX 4090", "RTX A6000"]
    gpu_of = {row["label"]: row["gpu_name"] for row in done.instances}
    jobs_on = {
        gpu_of[record.label]: sorted(job.split("-")[0] for job in record.jobs)
        for record in Ledger(done.workdir / ".snakemake" / "vastai").records()
    }
    assert jobs_on == {"RTX 4090": ["a1", "a2"], "RTX A6000": ["b1", "b2"]}
    assert_all_destroyed(fakevast, done.workdir)


# -- price rise above --vastai-max-price ---------------------------------------------------

PRICE_RISE = (
    TOKEN
    + """\
localrules: all, wait_for_go


rule all:
    input: "a2.txt", "b.txt"


rule a1:
    output: "a1.txt"
    resources: gpu_model="RTX_4090"
    shell: "echo a1-started; sleep 8; " + TOKEN + " > {output}"


rule a2:
    input: "a1.txt"
    output: "a2.txt"
    resources: gpu_model="RTX_4090"
    shell: TOKEN + " > {output}"


# The test creates "go" once a1's price has risen; b's boot then brings list calls every
# 2 s, which is how the pool learns prices while something boots (otherwise every 30 s).
rule wait_for_go:
    output: "go.txt"
    shell: "for i in $(seq 600); do [ -e go ] && break; sleep 0.1; done; touch {output}"


rule b:
    input: "go.txt"
    output: "b.txt"
    resources: gpu_model="RTX_3060"
    shell: "touch {output}"
"""
)
MAX_PRICE = 0.5


@pytest.mark.slow
def test_price_rise_above_the_cap_retires_the_instance_after_its_job(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """a1's instance rises to $0.9/h (cap $0.5) while a1 runs: the pool warns, lets a1
    finish, destroys it, and a2 runs on a newly rented instance; nothing is left running."""
    workdir = write_workflow(tmp_path / "wf", PRICE_RISE)
    options = ("--vastai-max-price", str(MAX_PRICE), "--vastai-reliability", "0")
    options += ("--vastai-no-datacenter",)
    with running_snakemake(workdir, fakevast, *options, jobs=3) as process:
        first = wait_until_running(fakevast, workdir, process, "a1-started")
        fakevast.set_faults({"instances": {str(first): {"price_rise": {"dph_total": 0.9}}}})
        (workdir / "go").touch()
        assert process.wait(timeout=120) == 0, (workdir / "snakemake.out").read_text()
    output = (workdir / "snakemake.out").read_text()

    rows = assert_all_destroyed(fakevast, workdir)
    raised = next(row for row in rows if row["id"] == first)
    assert raised["dph_total"] == 0.9
    replacement = [r for r in rows if r["gpu_name"] == "RTX 4090" and r["id"] != first]
    assert len(replacement) == 1  # a2 ran on a new instance, rented after the old one went
    assert replacement[0]["created_at"] >= raised["ended_at"]
    a1, a2 = tokens(workdir, "a1.txt", "a2.txt")
    assert a1 != a2
    assert f"now costs $0.900/h, above --vastai-max-price ${MAX_PRICE:.3f}/h" in output  # busy
    assert f"its price rose to $0.900/h, above --vastai-max-price ${MAX_PRICE:.3f}/h" in output
    by_id = {i["instance_id"]: i for i in run_summary(workdir)["instances"]}
    assert by_id[first]["jobs_run"] == 1


# -- orphans of a killed run --------------------------------------------------------------

NAP = """\
rule all:
    input: "nap.txt"


rule nap:
    output: "nap.txt"
    shell: "echo napping; sleep {config[nap]}; touch {output}"
"""


@pytest.mark.slow
def test_next_run_reaps_the_instance_of_a_killed_run(fakevast: FakeVast, tmp_path: Path) -> None:
    """kill -9 leaves the instance billing (nothing in the process survives); the next run
    in the workdir sees the dead run's free lock, destroys its instance at start, and works."""
    workdir = write_workflow(tmp_path / "wf", NAP)
    with running_snakemake(workdir, fakevast, "--config", "nap=60") as process:
        orphan = wait_until_running(fakevast, workdir, process, "napping")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert [row["id"] for row in fakevast.alive_instances()] == [orphan]

    # Snakemake's own directory lock and incomplete marker survive kill -9 too.
    done = finish(workdir, fakevast, "--config", "nap=0", "--nolock", "--rerun-incomplete")
    assert done.run.ok, done.run.output
    rows = assert_all_destroyed(fakevast, workdir)
    assert len(rows) == 2
    assert f"Destroying instance {orphan} left running by the dead run" in done.run.output


# -- nothing from an earlier job on the instance comes back as an output ------------------

STALE = """\
rule all:
    input: "b.txt"


rule a:
    output: "a.txt"
    shell: "echo A > {{output}}; echo stale-from-a > b.txt"


rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "{b_shell}"
"""


@pytest.mark.parametrize(
    ("b_shell", "expected"),
    [
        pytest.param("echo fresh-from-b > {output}", "fresh-from-b\n", id="b-writes-it"),
        pytest.param("cat {input} > /dev/null", None, id="b-forgets-it"),
    ],
)
def test_a_stray_file_of_an_earlier_job_is_never_shipped_back(
    fakevast: FakeVast, tmp_path: Path, b_shell: str, expected: str | None
) -> None:
    """Rule a leaves an undeclared b.txt where it ran; rule b, on the same warm instance,
    declares b.txt: b gets its own b.txt or fails naming it, never a's."""
    workdir = write_workflow(tmp_path / "wf", STALE.format(b_shell=b_shell))
    done = finish(workdir, fakevast)
    summary = run_summary(workdir)
    assert (summary["totals"]["instances"], summary["totals"]["jobs_run"]) == (1, 2)
    assert_all_destroyed(fakevast, workdir)
    if expected is not None:
        assert done.run.ok, done.run.output
        assert done.text("b.txt") == expected
        return
    assert not done.run.ok
    assert not (workdir / "b.txt").exists()
    [error] = job_errors(done.run.output)  # the instance's own snakemake found no b.txt
    assert error.startswith("rule b ") and "Missing files" in error and "\nb.txt (missing" in error


# -- a job whose resources Snakemake knows only once its input exists -----------------------

LATE_RESOURCES = """\
localrules: all


rule all:
    input: "out/2.txt"


rule first:
    output: "out/1.txt"
    shell: "sleep 1; echo 1 > {output}"


# Snakemake says <TBD> for this mem_mb until first has made the input.
rule second:
    input: "out/1.txt"
    output: "out/2.txt"
    resources: mem_mb=lambda wildcards, input: max(100, input.size_mb)
    shell: "cat {input} > {output}"
"""


def test_a_job_whose_resources_wait_for_its_input_still_keeps_the_instance(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """The edge plans every remote job once, as far as it is known at the start: a job whose
    memory depends on its input still counts as a job to come, so the instance of the job
    before it waits for it instead of being destroyed as wanted by no one."""
    workdir = write_workflow(tmp_path / "wf", LATE_RESOURCES)

    done = finish(workdir, fakevast, "--vastai-pool-ttl", "300", jobs=1)

    assert done.run.ok, done.run.output
    assert done.text("out/2.txt") == "1\n"
    assert len(done.instances) == 1, done.run.output
    assert "Reusing instance" in done.run.output
    assert_all_destroyed(fakevast, workdir)
