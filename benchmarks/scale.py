"""The scale case: ``python -m benchmarks.scale [--sizes 1000,5000] [--jobs 64]``.

Why: whatever the controller keeps per job it ran (a job's state, its log, its thread) costs
nothing in a run of ten jobs and runs a machine out of memory in a run of a hundred thousand.
This runs one workflow of independent ``sleep 0.05`` jobs (each ``gpu=1``, on 8-GPU offers, so
--jobs 64 packs onto 8 instances) at each size against a fresh fake, samples the local
Snakemake process (peak RSS, peak threads) and compares the sizes: the issue's budget is a
peak RSS within 10 % from the smallest size to the largest, and a thread count bounded by
--jobs, not by the jobs run.

Snakemake's own DAG and scheduler grow with the workflow whatever the executor, so each size
also runs as plain local Snakemake (``--cores`` = --jobs) with the same sampling: the
difference between the two is what the plugin holds, and its growth is what the plugin owes.
Writes ``benchmarks/results/scale.json`` after every size; exits 1 when a run failed, left an
output wrong or an instance alive (the budgets are reported, never asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import ProcessPeak, run_sampled
from benchmarks.measure import RATE_LIMITS, BenchmarkError, FakeBill, clean_env, plugin_summary
from benchmarks.report import header, write
from benchmarks.workflows import Workflow, load_outputs
from tests.fakevast.harness import FakeVast

HERE = Path(__file__).resolve().parent
SIZES = (1000, 5000)
PARALLEL = 64
BOOT_SECONDS = 5.0
# 8-GPU machines: every job takes one GPU, so 64 at once fill 8 instances; a few spare offers.
OFFER_COUNT = 12
OFFER = {"gpu_name": "RTX 4090", "num_gpus": 8, "dph_base": 3.20, "hosting_type": 1}
RSS_GROWTH_BUDGET = 0.10  # the issue: peak RSS at the largest size within 10 % of the smallest
# Threads the controller may hold besides one per running job, whatever the size: Snakemake's
# own (main, status loop, asyncio helpers), the plugin's reaper, one SSH transport per instance.
THREADS_BESIDE_JOBS = 32
SECONDS_PER_JOB = 2.0  # the timeout: generous on 2 CPUs, where a job takes ~0.2 s of wall
BASE_TIMEOUT_SECONDS = 600.0


@dataclass
class SizeResult:
    jobs: int
    parallel: int
    exit_status: int
    wall_seconds: float
    peak_rss_mb: float  # the controller: the local Snakemake process with the plugin
    peak_threads: int
    snakemake_cpu_seconds: float
    local_peak_rss_mb: float  # plain local Snakemake, same workflow: Snakemake's own share
    local_peak_threads: int
    local_wall_seconds: float
    outputs_correct: int
    instances_left_alive: int
    bill: FakeBill
    plugin_summary: dict[str, Any] | None
    load_average_1min: tuple[float, float]
    problems: list[str] = field(default_factory=list)

    @property
    def plugin_rss_mb(self) -> float:
        """What the plugin adds over local Snakemake's own peak for the same workflow."""
        return round(self.peak_rss_mb - self.local_peak_rss_mb, 1)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "bill"}
        return data | {
            "ok": not self.problems,
            "plugin_rss_mb": self.plugin_rss_mb,
            "instances": self.bill.instances,
            "api_calls_total": self.bill.api_calls_total,
            "billed_instance_seconds": self.bill.billed_instance_seconds,
            "dollars": self.bill.dollars,
            "refused_calls": self.bill.refused_calls,  # under the fake's rate limits or quota
            "rate_limited": self.bill.rate_limited,
            "quota_exceeded": self.bill.quota_exceeded,
        }


def write_offers(path: Path) -> Path:
    path.write_text(json.dumps([{"id": 9500001 + i, **OFFER} for i in range(OFFER_COUNT)]))
    return path


def timeout(jobs: int) -> float:
    return BASE_TIMEOUT_SECONDS + SECONDS_PER_JOB * jobs


def run_size(
    jobs: int, parallel: int, scratch: Path, boot_seconds: float = BOOT_SECONDS
) -> SizeResult:
    """One size, in ``scratch`` (created here; must not exist): plain local, then the plugin."""
    scratch.mkdir(parents=True)
    workflow = Workflow("scale", jobs, parallel)
    env = clean_env()
    local_dir = workflow.create(scratch / "local")
    local_command = [sys.executable, "-m", "snakemake", "--cores", str(parallel)]
    local_wall, local_code, local = run_sampled(
        local_command, local_dir, env, timeout(jobs), scratch / "local.log"
    )
    if local_code != 0:
        raise BenchmarkError(f"local Snakemake exited with {local_code}; see {scratch}/local.log")

    workdir = workflow.create(scratch / "workflow")
    load_before = os.getloadavg()[0]
    with FakeVast(
        rate_limits=RATE_LIMITS,
        boot_seconds=boot_seconds,
        offers=write_offers(scratch / "offers.json"),
    ) as fake:
        command = [
            sys.executable, "-m", "snakemake", "--executor", "vastai",
            "--jobs", str(parallel), "--vastai-api-url", fake.url,
        ]  # fmt: skip
        env = env | {"VAST_API_KEY": fake.api_key}
        wall, code, peak = run_sampled(
            command, workdir, env, timeout(jobs), scratch / "snakemake.log"
        )
        ledger = fake.ledger()
    alive = sum(1 for row in ledger["instances"] if row["ended_at"] is None)
    correct = sum(
        1
        for name, text in load_outputs(jobs, "scale").items()
        if (workdir / name).is_file() and (workdir / name).read_text() == text
    )
    result = SizeResult(
        jobs=jobs,
        parallel=parallel,
        exit_status=code,
        wall_seconds=wall,
        peak_rss_mb=megabytes(peak),
        peak_threads=peak.peak_threads,
        snakemake_cpu_seconds=round(peak.cpu_seconds, 1),
        local_peak_rss_mb=megabytes(local),
        local_peak_threads=local.peak_threads,
        local_wall_seconds=local_wall,
        outputs_correct=correct,
        instances_left_alive=alive,
        bill=FakeBill.from_ledger(ledger, time.time()),
        plugin_summary=plugin_summary(workdir),
        load_average_1min=(round(load_before, 2), round(os.getloadavg()[0], 2)),
    )
    if code != 0:
        result.problems.append(f"Snakemake exited with {code}; see {scratch / 'snakemake.log'}")
    if correct != jobs:
        result.problems.append(f"{jobs - correct} of {jobs} outputs missing or wrong")
    if alive:
        result.problems.append(f"{alive} instances still alive in the fake after Snakemake")
    if result.bill.refused_calls:  # a call the plugin did not pace
        result.problems.append(
            f"the fake refused {result.bill.refused_calls} calls under its rate limits or "
            f"quota: {result.bill.rate_limited} {result.bill.quota_exceeded}"
        )
    return result


def megabytes(peak: ProcessPeak) -> float:
    return round(peak.peak_rss_kb / 1024, 1)


def budgets(results: list[SizeResult]) -> dict[str, Any]:
    """The issue's two budgets, from the smallest and the largest size measured."""
    if len(results) < 2:
        return {}
    small, large = min(results, key=lambda r: r.jobs), max(results, key=lambda r: r.jobs)
    growth = large.peak_rss_mb / small.peak_rss_mb - 1
    plugin_growth = (large.plugin_rss_mb - small.plugin_rss_mb) / small.peak_rss_mb
    thread_limit = large.parallel + THREADS_BESIDE_JOBS
    return {
        "sizes": [small.jobs, large.jobs],
        "peak_rss_growth": round(growth, 4),
        "peak_rss_growth_met": growth <= RSS_GROWTH_BUDGET,
        # Snakemake's own growth taken out: the plugin's share, against the same 10 %.
        "local_peak_rss_growth": round(large.local_peak_rss_mb / small.local_peak_rss_mb - 1, 4),
        "plugin_rss_growth_of_controller": round(plugin_growth, 4),
        "plugin_rss_growth_met": plugin_growth <= RSS_GROWTH_BUDGET,
        "thread_limit": thread_limit,
        "peak_threads": [small.peak_threads, large.peak_threads],
        "threads_met": max(r.peak_threads for r in results) <= thread_limit,
    }


def document(head: dict[str, Any], results: list[SizeResult], parallel: int) -> dict[str, Any]:
    return {
        "header": head,
        "scale": {
            "parallel": parallel,
            "job": "sleep 0.05, then write a one-line output (gpu=1, mem_mb=1000, disk_mb=1000)",
            "offers": {"count": OFFER_COUNT, **OFFER},
            "rss_growth_budget": RSS_GROWTH_BUDGET,
            "threads_beside_jobs": THREADS_BESIDE_JOBS,
        },
        "sizes": [r.to_json() for r in results],
        "budgets": budgets(results),
    }


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"{'jobs':>6}{'exit':>5}{'wall s':>8}{'RSS MB':>8}{'local MB':>9}{'plugin MB':>10}"
        f"{'threads':>8}{'local thr':>10}{'inst':>5}{'alive':>6}{'outputs':>13}"
    ]
    for size in doc["sizes"]:
        lines.append(
            f"{size['jobs']:>6}{size['exit_status']:>5}{size['wall_seconds']:>8.1f}"
            f"{size['peak_rss_mb']:>8.1f}{size['local_peak_rss_mb']:>9.1f}"
            f"{size['plugin_rss_mb']:>10.1f}{size['peak_threads']:>8}"
            f"{size['local_peak_threads']:>10}{size['instances']:>5}"
            f"{size['instances_left_alive']:>6}{size['outputs_correct']:>7}/{size['jobs']:<5}"
        )
    found = doc["budgets"]
    if found:
        small, large = found["sizes"]
        verdict = {True: "met", False: "MISSED"}
        lines += [
            f"{verdict[found['peak_rss_growth_met']]:<7}peak RSS {small} -> {large} jobs: "
            f"{found['peak_rss_growth']:+.1%} (budget {RSS_GROWTH_BUDGET:+.0%}; local "
            f"Snakemake alone {found['local_peak_rss_growth']:+.1%})",
            f"{verdict[found['plugin_rss_growth_met']]:<7}the plugin's share of it: "
            f"{found['plugin_rss_growth_of_controller']:+.1%} of the controller",
            f"{verdict[found['threads_met']]:<7}peak threads {found['peak_threads']} <= "
            f"--jobs + {THREADS_BESIDE_JOBS} = {found['thread_limit']}",
        ]
    for size in doc["sizes"]:
        lines += [f"FAILED {size['jobs']} jobs: {problem}" for problem in size["problems"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="job counts")
    parser.add_argument("--jobs", type=int, default=PARALLEL, help="Snakemake's --jobs")
    parser.add_argument("--boot-seconds", type=float, default=BOOT_SECONDS)
    parser.add_argument("--output", type=Path, help="default: results/scale.json")
    args = parser.parse_args(argv)
    sizes = sorted(int(size) for size in args.sizes.split(","))
    default = sizes == list(SIZES) and args.jobs == PARALLEL
    name = "scale" if default else f"scale-{'-'.join(map(str, sizes))}-j{args.jobs}"
    output = args.output or HERE / "results" / f"{name}.json"
    scratch = HERE / "scratch" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    head = header(args.boot_seconds, False, ["python", "-m", "benchmarks.scale", *argv])
    results: list[SizeResult] = []
    for jobs in sizes:
        print(f"== scale: {jobs} jobs, {args.jobs} at once", flush=True)
        try:
            result = run_size(jobs, args.jobs, scratch / str(jobs), args.boot_seconds)
        except BenchmarkError as error:
            write(output, document(head, results, args.jobs) | {"error": f"{jobs}: {error}"})
            print(f"\nBENCHMARK FAILED at {jobs} jobs: {error}", file=sys.stderr)
            return 1
        results.append(result)
        print(f"   {result.wall_seconds:.1f} s, exit {result.exit_status}", flush=True)
        write(output, document(head, results, args.jobs))
    doc = document(head, results, args.jobs)
    print("\n" + render(doc) + f"\n\nresults: {output}\nscratch: {scratch}")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
