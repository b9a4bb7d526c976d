"""The edit-and-rerun loop: run a workflow, edit one script, run it again; cold and kept warm.

Why: the loop people live in is run, see that the evaluation is wrong, fix it, run again.
Without ``--vastai-keep-warm`` the rerun rents and boots again (30 s here, as the issue puts
it); with it, the first run leaves its idle instances up and the rerun adopts them. What the
rerun takes (wall time, and until its first remote job starts) and what the whole loop costs
(both runs, and the kept instances' idle time between them) are this case's figures.

Each mode runs in its own fresh workdir against its own fresh fake (the rate limits on, as on
Vast.ai): the first run with the mode's flags (MODES), the edit of ``scripts/evaluate.sh``,
IDLE_GAP_SECONDS of nothing, then the rerun, which only the evaluations need. The rerun never
keeps anything (no ``--vastai-keep-warm``), so it destroys every instance at its end, adopted
ones included: every mode's loop ends with nothing alive, and its dollars are all of it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import (
    OFFER,
    OFFER_COUNT,
    RATE_LIMITS,
    BenchmarkError,
    FakeBill,
    executor_command,
    plugin_summary,
    plugin_tree_digest,
    refused_calls_message,
    run_snakemake,
    save_requests,
    traced_env,
    uniform_offers,
)
from benchmarks.phases import JobTrace, job_traces, read_events
from benchmarks.report import ratio
from benchmarks.workflows import SLEEP_SECONDS, Workflow, edit_the_evaluation, rerun_outputs
from tests.fakevast.harness import FakeVast

BOOT_SECONDS = 30.0  # the boot for this loop
QUICK_BOOT_SECONDS = 5.0  # --quick: the standard cases' boot
# Between the first run's exit and the rerun's start: the user reads the result and edits
# the script. The kept instances bill all along, so the kept mode's dollars grow with it.
IDLE_GAP_SECONDS = 10.0
KEEP_WARM_SECONDS = 300
# What the first run is told to leave for the rerun; one entry per mode.
MODES: dict[str, tuple[str, ...]] = {
    "cold": (),  # nothing: it destroys everything, and the rerun rents and boots again
    "kept": ("--vastai-keep-warm", str(KEEP_WARM_SECONDS)),  # the rerun adopts them
}
CREATES = ("PUT /api/v0/asks/{id}/", "POST /api/v0/asks/bulk/")
ADOPTED = re.compile(r"Adopted instance \d+")
# How each figure is measured, for the results file.
HOW = {
    "rerun_wall_seconds": "the rerun's Snakemake subprocess, start to exit",
    "rerun_first_job_seconds": "the rerun's Snakemake start (epoch, just before the "
    "subprocess starts) to the first job's agent 'started' frame seen by the plugin (the "
    "probes' trace.jsonl, span 'frame' with detail 'S': the job's process runs on the "
    "instance)",
    "rerun_creates": "create requests (PUT /api/v0/asks/{id}/, POST /api/v0/asks/bulk/) in "
    "the fake's request log from the rerun's start on",
    "rerun_adopted": "'Adopted instance N' lines in the rerun's Snakemake log",
    "rerun_jobs": "jobs the rerun ran (the probes' run_job)",
    "dollars": "the whole loop as the fake billed it: the sum of its ledger's 'cost' (GPU, "
    "disk and bandwidth) over every instance of both runs, each from its create to its "
    "destroy (the rerun destroys every instance, kept ones included)",
    "idle_between_runs_instance_seconds": "instance-seconds billed between the first run's "
    "exit and the rerun's start (fake ledger: created_at to ended_at)",
    "idle_between_runs_dollars": "the same x dph_total / 3600",
}


@dataclass(frozen=True)
class Run:
    """One Snakemake run of the loop: its start and exit (epoch), and its folder (the
    Snakemake log and the probes' trace)."""

    started_at: float
    exited_at: float
    wall_seconds: float
    folder: Path

    def first_job_seconds(self) -> float | None:
        """Its start to the first job's agent reporting the job started (the "S" frame)."""
        frames = (job.frame("S") for job in self.jobs())
        started = [frame.end for frame in frames if frame is not None]
        return round(min(started) - self.started_at, 3) if started else None

    def jobs(self) -> list[JobTrace]:
        traces = job_traces(read_events(self.folder / "trace.jsonl")).values()
        return [job for job in traces if job.first("run_job") is not None]

    def adopted(self) -> int:
        return len(ADOPTED.findall((self.folder / "snakemake.log").read_text(errors="replace")))


@dataclass(frozen=True)
class LoopResult:
    mode: str
    args: list[str]  # the first run's flags (MODES)
    first_wall_seconds: float
    idle_gap_seconds: float  # measured: the first run's exit to the rerun's start
    rerun_wall_seconds: float
    rerun_first_job_seconds: float | None
    rerun_jobs: int
    rerun_creates: int
    rerun_adopted: int
    dollars: float  # the whole loop: the fake's bill, idle time included
    idle_between_runs_instance_seconds: float
    idle_between_runs_dollars: float
    bill: FakeBill  # the whole loop
    rerun_plugin_summary: dict[str, Any] | None  # totals of the rerun's summary-<run>.json
    load_average_1min: tuple[float, float]
    rate_limits: bool = RATE_LIMITS
    plugin_tree_sha256: str | None = None  # the plugin's files as this mode started

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "bill"} | self.bill.figures()


def default_boot_seconds(quick: bool) -> float:
    return QUICK_BOOT_SECONDS if quick else BOOT_SECONDS


def timeout(workflow: Workflow, boot_seconds: float) -> float:
    """Generous, per run: train, then every evaluation on an instance of its own, booted."""
    return 300.0 + (workflow.jobs + 1) * (boot_seconds + 15.0)


def run_mode(
    workflow: Workflow,
    mode: str,
    scratch: Path,
    boot_seconds: float = BOOT_SECONDS,
    rate_limits: bool = RATE_LIMITS,
    gap_seconds: float = IDLE_GAP_SECONDS,
) -> LoopResult:
    """The loop in one mode in ``scratch`` (created here; must not exist), measured."""
    scratch.mkdir(parents=True)
    workdir = workflow.create(scratch / "workflow")
    load_before = os.getloadavg()[0]
    plugin_tree = plugin_tree_digest()
    limit = timeout(workflow, boot_seconds)
    with FakeVast(
        rate_limits=rate_limits,
        boot_seconds=boot_seconds,
        offers=uniform_offers(scratch / "offers.json"),
    ) as fake:
        first = run(fake, workflow, workdir, scratch / "first", MODES[mode], rate_limits, limit)
        edit_the_evaluation(workdir)
        time.sleep(gap_seconds)
        rerun = run(fake, workflow, workdir, scratch / "rerun", (), rate_limits, limit)
        ledger = fake.ledger()
        requests = save_requests(fake, scratch / "requests.json") or []
    (scratch / "ledger.json").write_text(json.dumps(ledger))  # for analysis after the run
    bill = FakeBill.from_ledger(ledger, time.time())
    idle = idle_between(ledger["instances"], first.exited_at, rerun.started_at)
    result = LoopResult(
        mode=mode,
        args=list(MODES[mode]),
        first_wall_seconds=first.wall_seconds,
        idle_gap_seconds=round(rerun.started_at - first.exited_at, 3),
        rerun_wall_seconds=rerun.wall_seconds,
        rerun_first_job_seconds=rerun.first_job_seconds(),
        rerun_jobs=len(rerun.jobs()),
        rerun_creates=sum(
            1 for r in requests if r["endpoint"] in CREATES and r["t"] >= rerun.started_at
        ),
        rerun_adopted=rerun.adopted(),
        dollars=round(sum(row["cost"] for row in ledger["instances"]), 6),
        idle_between_runs_instance_seconds=round(sum(s for s, _ in idle), 3),
        idle_between_runs_dollars=round(sum(s * dph / 3600 for s, dph in idle), 6),
        bill=bill,
        rerun_plugin_summary=plugin_summary(workdir),
        load_average_1min=(round(load_before, 2), round(os.getloadavg()[0], 2)),
        rate_limits=rate_limits,
        plugin_tree_sha256=plugin_tree,
    )
    check(result, workdir, workflow, scratch)
    return result


def run(
    fake: FakeVast,
    workflow: Workflow,
    workdir: Path,
    folder: Path,
    flags: tuple[str, ...],
    rate_limits: bool,
    limit: float,
) -> Run:
    """One traced run of the workflow against ``fake``, its log and trace in ``folder``."""
    folder.mkdir()
    command = executor_command(fake, workflow.parallel, *flags)
    env = traced_env(fake, folder / "trace.jsonl", rate_limits)
    started = time.time()
    wall = run_snakemake(command, workdir, env, limit, folder / "snakemake.log")
    return Run(started, time.time(), wall, folder)


def idle_between(rows: list[dict[str, Any]], start: float, end: float) -> list[tuple[float, float]]:
    """Per instance alive between the runs: its seconds billed in [start, end], its $/h."""
    found = []
    for row in rows:
        ended = end if row["ended_at"] is None else min(row["ended_at"], end)
        seconds = ended - max(row["created_at"], start)
        if seconds > 0:
            found.append((seconds, row["dph_total"]))
    return found


def check(result: LoopResult, workdir: Path, workflow: Workflow, scratch: Path) -> None:
    """The loop ran as it must: nothing left billing, no call refused, every evaluation
    made again by the edited script. A BenchmarkError keeps the figures."""
    if not result.bill.nothing_left_running:
        raise BenchmarkError("instances still running in the fake after the rerun", result)
    if result.bill.refused_calls:
        raise BenchmarkError(refused_calls_message(result.bill, scratch), result)
    for name, text in rerun_outputs(workflow.jobs).items():
        path = workdir / name
        if not path.is_file() or path.read_text() != text:
            raise BenchmarkError(f"{path} is not the edited evaluation's output", result)


def speedups(results: list[LoopResult]) -> list[dict[str, Any]]:
    """Cold over each other mode: how many times longer the rerun takes, and waits for its
    first remote job, and how many times more the loop costs without what it kept."""
    cold = next((r for r in results if r.mode == "cold"), None)
    if cold is None:
        return []
    found = []
    for r in results:
        if r is cold:
            continue
        waits = (cold.rerun_first_job_seconds, r.rerun_first_job_seconds)
        found.append(
            {
                "mode": r.mode,
                "rerun_wall": ratio(cold.rerun_wall_seconds, r.rerun_wall_seconds),
                "rerun_first_job": None if None in waits else ratio(*waits),
                "dollars": ratio(cold.dollars, r.dollars),
            }
        )
    return found


def rerun_document(
    head: dict[str, Any],
    workflow: Workflow,
    boot_seconds: float,
    results: list[LoopResult],
    rate_limits: bool = RATE_LIMITS,
    gap_seconds: float = IDLE_GAP_SECONDS,
) -> dict[str, Any]:
    return {
        "header": head,
        "rerun": {
            "rate_limits": rate_limits,
            "workflow": f"a local prepare, a GPU train, {workflow.jobs} GPU evaluations "
            f"reading scripts/evaluate.sh; each GPU job (gpu=1) sleeps "
            f"{SLEEP_SECONDS['rerun']:g} s first",
            "evaluations": workflow.jobs,
            "parallel": workflow.parallel,
            "boot_seconds": boot_seconds,
            "idle_gap_seconds": gap_seconds,
            "loop": "first run with the mode's flags, edit scripts/evaluate.sh, the idle gap, "
            "the rerun without --vastai-keep-warm (it destroys every instance at its end)",
            "modes": {mode: list(flags) for mode, flags in MODES.items()},
            "offers": {"count": OFFER_COUNT, **OFFER},
            "how": HOW,
        },
        "modes": [r.to_json() for r in results],
        "speedups_cold_over_mode": speedups(results),
    }


def render_rerun(doc: dict[str, Any]) -> str:
    loop = doc["rerun"]
    lines = [
        f"rerun: {loop['evaluations']} evaluations at --jobs {loop['parallel']}, boot "
        f"{loop['boot_seconds']:g} s, idle gap {loop['idle_gap_seconds']:g} s, rate limits "
        f"{'on' if loop.get('rate_limits') else 'OFF'}",
        f"{'mode':<7}{'first s':>8}{'gap s':>7}{'rerun s':>9}{'1st job s':>11}{'jobs':>6}"
        f"{'creates':>9}{'adopted':>9}{'inst':>6}{'billed s':>10}{'loop $':>9}{'idle $':>9}"
        f"{'refused':>9}{'clean':>7}",
    ]
    for m in doc["modes"]:
        first_job = m["rerun_first_job_seconds"]
        lines.append(
            f"{m['mode']:<7}{m['first_wall_seconds']:>8.1f}{m['idle_gap_seconds']:>7.1f}"
            f"{m['rerun_wall_seconds']:>9.1f}"
            f"{'-' if first_job is None else f'{first_job:.1f}':>11}{m['rerun_jobs']:>6}"
            f"{m['rerun_creates']:>9}{m['rerun_adopted']:>9}{m['instances']:>6}"
            f"{m['billed_instance_seconds']:>10.1f}{m['dollars']:>9.4f}"
            f"{m['idle_between_runs_dollars']:>9.4f}{m['refused_calls']:>9}"
            f"{'yes' if m['nothing_left_running'] else 'NO':>7}"
        )
    for s in doc["speedups_cold_over_mode"]:
        first_job = "-" if s["rerun_first_job"] is None else f"{s['rerun_first_job']:.2f}"
        lines.append(
            f"cold/{s['mode']}: rerun wall x{s['rerun_wall']:.2f}, first remote job "
            f"x{first_job}, loop $ x{s['dollars']:.2f}"
        )
    return "\n".join(lines)
