"""The load case: hundreds of short independent jobs under a steady rate of API errors.

Why: the chain and the fanout measure what the pool saves on a few jobs. This measures how the
plugin holds up when it is busy: 500 jobs of ``sleep 0.1`` at ``--jobs 32`` (quick: 60 at 8),
with 10 % of all API calls answered 429 and 2 % answered 503, once with job packing (the
default) and once with ``--vastai-no-pack``, against a fake that also keeps to Vast.ai's rate
limits (a create every 4.5 s, ...), as the real marketplace does. What counts is that the run
finishes (exit 0, every output right, nothing left rented, no call refused by the limits),
and at what price: wall time, the local Snakemake's peak memory, API calls per job and
instances rented.

Unlike the standard cases, a failed variant does not stop the benchmark: its exit status is
one of the figures, and the next variant still runs. ``python -m benchmarks`` exits 1 at the
end if any variant failed, left an instance alive or left an output missing or wrong.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.measure import (
    RATE_LIMITS,
    BenchmarkError,
    FakeBill,
    clean_env,
    last_output_at,
    plugin_summary,
    plugin_tree_digest,
    save_requests,
    wait_or_stop,
)
from benchmarks.workflows import LOAD_SLEEP_SECONDS, Workflow, load_outputs
from tests.fakevast.harness import FakeVast

BOOT_SECONDS = 5.0  # a small image already cached on the host; both full and quick
# 10 % of all API calls answered 429, 2 % answered 503, for the whole run. The fake draws
# from a seeded generator, but the order of the plugin's calls varies from run to run, so
# which calls fail does too; the rates hold. (The 503 rule only draws for calls the 429 rule
# let through, so its rate is 0.9 x 2 % = 1.8 % of all calls.) The fake's rate limits answer
# before the fault rules: a call they refuse draws no fault, and the ledger counts it apart
# (``rate_limited``), so these injected 429s are never mistaken for the limiter's.
FAULTS: dict[str, Any] = {
    "seed": 1,
    "http": [
        {"status": 429, "probability": 0.1, "count": None},
        {"status": 503, "probability": 0.02, "count": None},
    ],
}
VARIANTS: dict[str, tuple[str, ...]] = {
    "pack": (),  # the default: several jobs share an instance while its resources suffice
    "no-pack": ("--vastai-no-pack",),  # one job per instance at a time
}
# A uniform catalogue of 4-GPU machines: each job takes one GPU (gpu=1), so packing can put up
# to four on an instance; with one GPU per offer both variants would be the same run. 40
# offers: --jobs 32 without packing may want 32 instances at once.
OFFER_COUNT = 40
OFFER = {"gpu_name": "RTX 4090", "num_gpus": 4, "dph_base": 1.60, "hosting_type": 1}
SAMPLE_SECONDS = 0.2  # /proc sampling of the local Snakemake


@dataclass
class ProcessPeak:
    """The local Snakemake process itself (all its threads, none of its children), sampled
    from /proc/<pid>: VmHWM is the kernel's own high-water mark of its resident memory, so a
    sample misses at most the growth of its last interval."""

    peak_rss_kb: int = 0  # max VmHWM seen
    peak_threads: int = 0
    cpu_seconds: float = 0.0  # user + system, last sample
    samples: int = 0

    def sample(self, pid: int) -> bool:
        """Read one sample; False once the process is gone (or a zombie without memory)."""
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmHWM" not in fields:
            return False
        self.peak_rss_kb = max(self.peak_rss_kb, int(fields["VmHWM"].split()[0]))
        self.peak_threads = max(self.peak_threads, int(fields["Threads"]))
        # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        ticks = stat.rsplit(")", 1)[1].split()
        self.cpu_seconds = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
        self.samples += 1
        return True

    def watch(self, pid: int, done: threading.Event) -> threading.Thread:
        def loop() -> None:
            while not done.is_set() and self.sample(pid):
                done.wait(SAMPLE_SECONDS)

        thread = threading.Thread(target=loop, name=f"sample-{pid}", daemon=True)
        thread.start()
        return thread


@dataclass
class LoadResult:
    variant: str
    args: list[str]  # the flags this variant adds to the command line
    jobs: int
    parallel: int
    exit_status: int
    wall_seconds: float
    peak_rss_mb: float
    peak_threads: int
    snakemake_cpu_seconds: float
    # Everything the variant started, once reaped: Snakemake, the fake, its instances and the
    # remote jobs in them. Against 2 x wall, it tells this case's own CPU from other work's.
    case_cpu_seconds: float
    outputs_correct: int  # of `jobs`: present with the exact expected text
    instances_left_alive: int  # in the fake when Snakemake had exited; must be 0
    bill: FakeBill
    # Statuses of the /api/ answers as the fake logged them; None if the fake keeps no log.
    api_statuses: dict[str, int] | None
    # Of those, the answers the fault rules gave (429 less the limiter's refusals, 503).
    faults_fired: dict[str, int] | None
    plugin_summary: dict[str, Any] | None
    load_average_1min: tuple[float, float]
    rate_limits: bool = RATE_LIMITS
    # The last output's mtime to the last destroy in the fake, and to Snakemake's exit.
    teardown_seconds: float | None = None
    exit_after_last_output_seconds: float | None = None
    plugin_tree_sha256: str | None = None  # the plugin's files as this variant started
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "bill"}
        bill = self.bill
        return data | {
            "ok": self.ok,
            "api_calls_total": bill.api_calls_total,
            "api_calls_per_job": round(bill.api_calls_total / self.jobs, 3),
            "instances": bill.instances,
            "billed_instance_seconds": bill.billed_instance_seconds,
            "dollars": bill.dollars,
            "boot_seconds": bill.boot_seconds,
            "ssh_bytes_up": bill.ssh_bytes_up,
            "ssh_bytes_down": bill.ssh_bytes_down,
            "api_calls": bill.api_calls,
            "refused_calls": bill.refused_calls,
            "rate_limited": bill.rate_limited,
            "quota_exceeded": bill.quota_exceeded,
        }


def write_offers(path: Path) -> Path:
    """The load's catalogue as an ``--offers`` file for the fake."""
    path.write_text(json.dumps([{"id": 9400001 + i, **OFFER} for i in range(OFFER_COUNT)]))
    return path


def timeout(workflow: Workflow) -> float:
    """Generous: ~2 s per job on 2 CPUs is well above the expected ~0.5 s."""
    return 600.0 + 2.0 * workflow.jobs


def run_variant(
    workflow: Workflow,
    variant: str,
    scratch: Path,
    boot_seconds: float = BOOT_SECONDS,
    faults: dict[str, Any] | None = FAULTS,
    rate_limits: bool = RATE_LIMITS,
) -> LoadResult:
    """One run of the load in ``scratch`` (created here; must not exist), measured."""
    scratch.mkdir(parents=True)
    workdir = workflow.create(scratch / "workflow")
    offers = write_offers(scratch / "offers.json")
    load_before = os.getloadavg()[0]
    plugin_tree = plugin_tree_digest()
    cpu_before = children_cpu_seconds()
    with FakeVast(rate_limits=rate_limits, boot_seconds=boot_seconds, offers=offers) as fake:
        if faults is not None:
            set_faults(fake, faults)
        command = [
            sys.executable, "-m", "snakemake",
            "--executor", "vastai",
            "--jobs", str(workflow.parallel),
            "--vastai-api-url", fake.url,
            *VARIANTS[variant],
        ]  # fmt: skip
        env = clean_env(rate_limits) | {"VAST_API_KEY": fake.api_key}
        wall, code, peak = run_sampled(
            command, workdir, env, timeout(workflow), scratch / "snakemake.log"
        )
        exited_at = time.time()
        ledger = fake.ledger()
        alive = sum(1 for row in ledger["instances"] if row["ended_at"] is None)
        bill = FakeBill.from_ledger(ledger, time.time())
        statuses = api_statuses(save_requests(fake, scratch / "requests.json"))
    (scratch / "ledger.json").write_text(json.dumps(ledger))  # for analysis after the run
    case_cpu = children_cpu_seconds() - cpu_before  # the fake has exited and been reaped
    correct = correct_outputs(workdir, workflow.jobs)
    last_output = last_output_at(workdir, workflow.outputs)
    result = LoadResult(
        variant=variant,
        args=list(VARIANTS[variant]),
        jobs=workflow.jobs,
        parallel=workflow.parallel,
        exit_status=code,
        wall_seconds=wall,
        peak_rss_mb=round(peak.peak_rss_kb / 1024, 1),
        peak_threads=peak.peak_threads,
        snakemake_cpu_seconds=round(peak.cpu_seconds, 2),
        case_cpu_seconds=round(case_cpu, 1),
        outputs_correct=correct,
        instances_left_alive=alive,
        bill=bill,
        api_statuses=statuses,
        faults_fired=faults_fired(statuses, faults, bill),
        plugin_summary=plugin_summary(workdir),
        load_average_1min=(round(load_before, 2), round(os.getloadavg()[0], 2)),
        rate_limits=rate_limits,
        teardown_seconds=bill.teardown_seconds(last_output),
        exit_after_last_output_seconds=None
        if last_output is None
        else round(exited_at - last_output, 3),
        plugin_tree_sha256=plugin_tree,
    )
    if code != 0:
        result.problems.append(f"Snakemake exited with {code}; see {scratch / 'snakemake.log'}")
    if correct != workflow.jobs:
        result.problems.append(f"{workflow.jobs - correct} of {workflow.jobs} outputs wrong")
    if alive:
        result.problems.append(f"{alive} instances still alive in the fake after Snakemake")
    if bill.refused_calls:
        result.problems.append(
            f"the fake refused {bill.refused_calls} calls under its rate limits or quota "
            f"(rate_limited {bill.rate_limited}, quota_exceeded {bill.quota_exceeded}); see "
            f"{scratch / 'ledger.json'}"
        )
    return result


def faults_fired(
    statuses: dict[str, int] | None, faults: dict[str, Any] | None, bill: FakeBill
) -> dict[str, int] | None:
    """The answers the fault rules gave: the request log's counts of their statuses, less
    the limiter's and the quota's refusals (also 429s, but counted in the ledger apart)."""
    if statuses is None:
        return None
    fired = {}
    for rule in (faults or {}).get("http", []):
        status = str(rule["status"])
        count = statuses.get(status, 0)
        if status == "429":
            count -= bill.refused_calls
        fired[status] = count
    return {s: n for s, n in sorted(fired.items()) if n}


def run_sampled(
    command: list[str], workdir: Path, env: dict[str, str], limit: float, log: Path
) -> tuple[float, int, ProcessPeak]:
    """Wall seconds, exit status and the /proc peaks of one Snakemake run. On timeout, Ctrl-C
    or SIGTERM, Snakemake gets SIGINT (its teardown destroys the instances), as in measure."""
    peak = ProcessPeak()
    done = threading.Event()
    with open(log, "w") as out:
        start = time.monotonic()
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        sampler = peak.watch(process.pid, done)
        try:
            code = wait_or_stop(process, limit, log)
        finally:
            done.set()
            sampler.join(timeout=5)
        wall = time.monotonic() - start
    return round(wall, 3), code, peak


def set_faults(fake: FakeVast, faults: dict[str, Any]) -> None:
    try:
        fake.set_faults(faults)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        raise BenchmarkError(
            f"the fake rejected the fault document (it needs the http rules' probability and "
            f"the top-level seed): {detail}; --no-faults runs the case without them"
        ) from None


def api_statuses(requests: list[dict[str, Any]] | None) -> dict[str, int] | None:
    """How the fake answered every /api/ request, by status; None if it keeps no request
    log (GET /_fake/requests), since the ledger counts calls without their answers."""
    if requests is None:
        return None
    counts = Counter(str(row.get("status")) for row in requests)
    return dict(sorted(counts.items()))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def correct_outputs(workdir: Path, jobs: int) -> int:
    found = 0
    for name, text in load_outputs(jobs).items():
        path = workdir / name
        if path.is_file() and path.read_text() == text:
            found += 1
    return found


def load_document(
    head: dict[str, Any],
    workflow: Workflow,
    boot_seconds: float,
    faults: dict[str, Any] | None,
    results: list[LoadResult],
    rate_limits: bool = RATE_LIMITS,
) -> dict[str, Any]:
    return {
        "header": head,
        "load": {
            "rate_limits": rate_limits,
            "jobs": workflow.jobs,
            "parallel": workflow.parallel,
            "job": f"sleep {LOAD_SLEEP_SECONDS:g}, then write a one-line output",
            "boot_seconds": boot_seconds,
            "faults": faults,
            "offers": {"count": OFFER_COUNT, **OFFER},
        },
        "variants": [r.to_json() for r in results],
    }


def render_load(doc: dict[str, Any]) -> str:
    load = doc["load"]
    lines = [
        f"load: {load['jobs']} jobs at --jobs {load['parallel']}, boot {load['boot_seconds']:g} s,"
        f" faults {'on' if load['faults'] else 'OFF'}, rate limits "
        f"{'on' if load.get('rate_limits') else 'OFF'}",
        f"{'variant':<9}{'exit':>5}{'wall s':>8}{'RSS MB':>8}{'thr':>5}{'smk CPU':>8}"
        f"{'all CPU':>8}{'API':>6}{'/job':>6}{'inst':>6}{'alive':>6}{'billed s':>10}{'$':>8}"
        f"{'outputs':>9}{'load':>11}{'refused':>8}{'teardown s':>11}  faults",
    ]
    for v in doc["variants"]:
        fired = v["faults_fired"]
        before, after = v["load_average_1min"]
        load = f"{before:>5.1f}>{after:<4.1f}"
        faults = "?" if fired is None else " ".join(f"{s}x{n}" for s, n in fired.items()) or "0"
        teardown = v.get("teardown_seconds")
        teardown_cell = f"{'-':>11}" if teardown is None else f"{teardown:>11.1f}"
        lines.append(
            f"{v['variant']:<9}{v['exit_status']:>5}{v['wall_seconds']:>8.1f}"
            f"{v['peak_rss_mb']:>8.1f}{v['peak_threads']:>5}{v['snakemake_cpu_seconds']:>8.1f}"
            f"{v['case_cpu_seconds']:>8.0f}{v['api_calls_total']:>6}"
            f"{v['api_calls_per_job']:>6.2f}{v['instances']:>6}"
            f"{v['instances_left_alive']:>6}{v['billed_instance_seconds']:>10.1f}"
            f"{v['dollars']:>8.4f}{v['outputs_correct']:>5}/{v['jobs']:<3}{load:>11}"
            f"{v.get('refused_calls', '?'):>8}{teardown_cell}  {faults}"
        )
    for v in doc["variants"]:
        for problem in v["problems"]:
            lines.append(f"FAILED {v['variant']}: {problem}")
    return "\n".join(lines)
