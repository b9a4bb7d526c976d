"""What a person watching a run reads: real ``snakemake --executor vastai`` runs against the
fake marketplace, checked line by line for the offer taken, boot progress, bootstrap, slow
transfers, packing, destroys with their reason and the running total; ``--quiet`` hides
them, ``--verbose`` adds the queries and SSH detail, and no line says the same thing twice.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest

from snakemake_executor_plugin_vastai.market.marketplace import InstanceInfo
from snakemake_executor_plugin_vastai.pool.progress import BootProgress, SpendTicker
from snakemake_executor_plugin_vastai.pool.states import State
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    JOB_LOGS,
    assert_all_destroyed,
    job_errors,
    one_rule_workflow,
    rented,
    run_snakemake,
    write_workflow,
)

# The plugin's own progress lines, by how they start.
PROGRESS = re.compile(
    r"^(Rented|Instance \d+|Uploaded|Downloaded|Packing|Reusing|Destroying|Vast\.ai: )"
)
RENTED = re.compile(
    r"^Rented instance (\d+) for (\S+), offer (\d+): (\d+)x ([^,]+), .*, "
    r"reliability ([\d.]+)%, \$([\d.]+)/h$"
)
BIG_BYTES = 2_500_000
BANDWIDTH = 1_000_000  # bytes/s per direction: each big transfer takes about 2.5 s

TRANSFER_SNAKEFILE = """\
rule all:
    input: "copy.bin", "note.txt"


rule copy:
    input: "big.bin"
    output: "copy.bin"
    shell: "sleep 2; cp {input} {output}"


rule note:
    output: "note.txt"
    shell: "sleep 2; echo hi > {output}"
"""


def progress_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if PROGRESS.match(line)]


def assert_nothing_said_twice(output: str) -> None:
    repeated = [line for line, n in Counter(progress_lines(output)).items() if n > 1]
    assert not repeated, repeated


def one_match(pattern: str, output: str) -> re.Match[str]:
    found = list(re.finditer(pattern, output, re.MULTILINE))
    assert len(found) == 1, (pattern, [m[0] for m in found], output)
    return found[0]


def test_a_run_says_what_it_rents_ships_packs_and_destroys(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Two CPU jobs at once: the first rents, the second is packed beside it; a 2.5 MB input
    and output cross a 1 MB/s link, so both transfers are worth a line."""
    workdir = write_workflow(tmp_path / "wf", TRANSFER_SNAKEFILE)
    (workdir / "big.bin").write_bytes(os.urandom(BIG_BYTES))  # untracked: not a source
    fakevast.set_faults({"bandwidth": BANDWIDTH})

    run = run_snakemake(workdir, fakevast, jobs=2)

    assert run.ok, run.output
    [instance] = assert_all_destroyed(fakevast, workdir)
    rent = one_match(RENTED.pattern, run.output)
    assert int(rent[1]) == instance["id"] and int(rent[3]) == instance["offer_id"]
    assert (int(rent[4]), rent[5]) == (instance["num_gpus"], instance["gpu_name"])
    assert float(rent[7]) == pytest.approx(instance["dph_total"], abs=0.0005)
    assert 0 < float(rent[6]) <= 100
    packed = "note" if rent[2].startswith("copy") else "copy"
    one_match(
        rf"^Packing {packed}-\d+-a1 onto instance {instance['id']}( \(still booting\))? "
        "beside 1 job$",
        run.output,
    )
    one_match(rf"^Instance {instance['id']} booted in [\d.]+ s; bootstrapping$", run.output)
    one_match(rf"^Instance {instance['id']} bootstrapped in [\d.]+ s$", run.output)
    for verb, way in (("Uploaded", "to"), ("Downloaded", "from")):
        line = one_match(
            rf"^{verb} ([\d.]+) MB {way} instance {instance['id']} for copy-\d+-a1 "
            r"in ([\d.]+) s \([\d.]+ [kMG]?B/s\)$",
            run.output,
        )
        assert float(line[1]) >= BIG_BYTES / 1e6 and float(line[2]) > 1, line[0]
    one_match(
        rf"^Destroying instance {instance['id']} \(.*\): no job still to run can use it$",
        run.output,
    )
    assert_nothing_said_twice(run.output)


@pytest.mark.slow
def test_quiet_hides_the_progress_and_verbose_adds_queries_and_ssh_detail(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    quiet = run_snakemake(workdir, fakevast, "--quiet", jobs=1)
    verbose = run_snakemake(workdir, fakevast, "--forceall", "--verbose", jobs=1)

    assert quiet.ok, quiet.output
    assert progress_lines(quiet.output) == [], quiet.output
    assert verbose.ok, verbose.output
    for said in ("Rented instance", "Destroying instance", "bootstrapped in"):
        assert said in verbose.output and said not in quiet.output, said
    for detail in ("Offer query for make: ", ": connecting via root@", ": connected via root@"):
        assert detail in verbose.output and detail not in quiet.output, detail
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow
def test_a_rerun_that_fails_before_its_job_starts_shows_no_old_log(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """The job's local log is named by its tag, the same in a rerun: a rerun whose instance
    never lets it in must not offer the earlier run's output as its own. Its error names
    the instance once."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo FIRST-''RUN; echo hi > {output}")
    first = run_snakemake(workdir, fakevast, jobs=1)
    assert first.ok, first.output
    [log] = sorted((workdir / JOB_LOGS).iterdir())
    assert "FIRST-RUN" in log.read_text()

    rerun = run_snakemake(
        workdir, fakevast, "--forceall", "--vastai-image", "nossh/alpine:3.20",
        "--vastai-boot-timeout", "20", jobs=1,
    )  # fmt: skip

    assert rerun.returncode != 0, rerun.output
    assert not log.exists() and "FIRST-RUN" not in rerun.output
    [error] = job_errors(rerun.output)
    instance = rented(fakevast)[-1]["id"]
    assert "booted but SSH login failed: could not connect via" in error, error
    assert error.count(f"instance {instance}") == 1, error
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow
def test_a_long_boot_and_job_report_progress_and_the_running_total(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """A 36 s boot gets a line at about 15 and 30 s with Vast's own status message; with
    the instance alive past a minute, the running total says what it costs."""
    fake = fakevast_factory(boot_seconds=36)
    workdir = one_rule_workflow(tmp_path / "wf", "sleep 30; echo hi > {output}")

    run = run_snakemake(workdir, fake, jobs=1)

    assert run.ok, run.output
    [instance] = assert_all_destroyed(fake, workdir)
    booting = re.findall(
        rf"^Instance {instance['id']} still booting after (\d+) s: (.*)$", run.output, re.M
    )
    assert len(booting) >= 2, run.output
    elapsed = [int(seconds) for seconds, _ in booting]
    assert elapsed[0] >= 15, elapsed
    assert all(later - earlier >= 14 for earlier, later in pairwise(elapsed)), elapsed
    assert [said for _, said in booting[:2]] == [f"loading, Pulling image {instance['image']}"] * 2
    totals = re.findall(
        r"^Vast\.ai: 1 instance alive, \$([\d.]+)/h, \$([\d.]+) spent so far$", run.output, re.M
    )
    assert totals, run.output
    assert float(totals[0][0]) == pytest.approx(instance["dph_total"], abs=0.0005)
    assert float(totals[0][1]) > 0
    assert_nothing_said_twice(run.output)


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [record.getMessage() for record in caplog.records]
    caplog.clear()
    return lines


def booting_instance(status_msg: str) -> SimpleNamespace:
    info = InstanceInfo(
        id=7, label="label", actual_status="loading", intended_status="running",
        status_msg=status_msg, ssh_host=None, ssh_port=None, public_ipaddr=None,
        direct_ssh_port=None, dph_total=0.5, start_date=0.0,
    )  # fmt: skip
    return SimpleNamespace(
        instance_id=7, label="label", boot_began=1000.0, info=info, booted=lambda: False
    )


def test_boot_lines_come_once_per_interval_with_the_status_on_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Driven by list rounds every second: no line for the first 15 s, then one per 15 s;
    a multi-line status message is folded, a long one cut, and secrets redacted."""
    caplog.set_level(logging.INFO, logger="snakemake.logging.vastai")
    progress = BootProgress(redact=lambda text: text.replace("hunter2", "***"))
    instance = booting_instance("Pulling image\n  layer 3/7 hunter2 " + "x" * 200)
    lines = []
    for second in range(1, 47):
        progress.observe(instance, 1000.0 + second)
        lines += [(second, line) for line in said(caplog)]
    assert [second for second, _ in lines] == [15, 30, 45]
    first = lines[0][1]
    assert first.startswith(
        "Instance 7 still booting after 15 s: loading, Pulling image layer 3/7 *** xxx"
    )
    assert first.endswith("…") and "\n" not in first and len(first) < 160


def test_the_running_total_speaks_only_when_something_is_alive_and_it_changed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="snakemake.logging.vastai")
    ticker = SpendTicker()
    alive = SimpleNamespace(instance_id=1, state=State.BUSY, billing_rate=0.42)
    gone = SimpleNamespace(instance_id=2, state=State.GONE, dph_total=1.0)
    reserved = SimpleNamespace(instance_id=None, state=State.RENTING, dph_total=0.3)

    ticker.tick([gone, reserved], 0.05)
    assert said(caplog) == []
    ticker.tick([alive, gone, reserved], 0.0312)
    assert said(caplog) == ["Vast.ai: 1 instance alive, $0.420/h, $0.0312 spent so far"]
    ticker.tick([alive, gone], 0.03121)  # the same at the shown precision
    assert said(caplog) == []
    ticker.tick([alive, alive], 0.04)
    assert said(caplog) == ["Vast.ai: 2 instances alive, $0.840/h, $0.0400 spent so far"]
