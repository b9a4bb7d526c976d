"""Running one case (a workflow in one mode) and reading what it cost.

Why a fresh fake and a fresh workdir per case: the fake's ledger then holds exactly this
case's instances, API calls and SSH bytes, and the plugin's state (ledger, keys, summary)
starts empty, so no number depends on the order the cases ran in.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.phases import job_phases
from benchmarks.tracer import TRACE_ENV
from benchmarks.workflows import Workflow
from snakemake_executor_plugin_vastai.market.marketplace import UNPACED_ENV
from tests.fakevast.harness import FakeVast

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every case runs against a fake that lives by Vast.ai's rate limits (search 10/min, a create
# every 4.5 s, destroy 3 s, list 1 s, show 2 s), with the plugin pacing itself, as a user's run
# does; ``--no-rate-limits`` runs without both, for comparison only (its own results file).
RATE_LIMITS = True
# "pool-rtt": the pool with a simulated round-trip time on the fake's SSH relays (--rtt-ms).
MODES = ("local", "ttl0", "pool", "pool-rtt")
POOL_TTL = {"ttl0": 0, "pool": 300, "pool-rtt": 300}
LOGS = Path(".snakemake/auxiliary/vastai-logs")  # the plugin's copy of each job's output
STOP_GRACE_SECONDS = 120.0  # Snakemake's teardown after SIGINT destroys instances

# A uniform catalogue: every offer the same GPU at the same price, datacenter and reliable,
# so the default search matches all of them and the dollars of two modes compare directly.
# The bundled catalogue has only 5 offers that the default search matches, fewer than
# --jobs 8 needs at once (see the README).
OFFER_COUNT = 16
# Disk at $0.15/GB/month (storage_total_cost = storage_cost x disk GB / 720 $/h: $0.0083/h
# for the plugin's default 40 GB), stated although it is the fake catalogue's default: the
# median of the bundled catalogue (0.10-0.25), and what a stopped instance still pays.
OFFER = {"gpu_name": "RTX 4090", "dph_base": 0.40, "hosting_type": 1, "storage_cost": 0.15}


class BenchmarkError(RuntimeError):
    """A case did not run as it must (Snakemake failed or timed out, an instance was left, the
    fake refused a call under its rate limits). ``result`` is the case as measured, when it
    ran to the end, so a results file keeps the figures of the case that failed."""

    def __init__(self, message: str, result: CaseResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Case:
    workflow: Workflow
    mode: str  # one of MODES
    boot_seconds: float
    rtt_ms: float = 0.0  # the fake's SSH round-trip time; only the pool-rtt mode sets one
    rate_limits: bool = RATE_LIMITS  # the fake's rate limits, and the plugin's pacing

    @property
    def label(self) -> str:
        """The mode as results name it: pool-rtt with its round-trip time (pool-rtt50)."""
        return f"pool-rtt{self.rtt_ms:g}" if self.mode == "pool-rtt" else self.mode

    @property
    def name(self) -> str:
        return f"{self.workflow.name}/{self.label}"

    @property
    def timeout(self) -> float:
        """Generous: every job booting its own instance, one wave of `parallel` at a time."""
        waves = -(-self.workflow.jobs // self.workflow.parallel)
        return 300.0 + 15.0 * self.workflow.jobs + waves * (self.boot_seconds + 15.0)


@dataclass(frozen=True)
class FakeBill:
    """What the fake marketplace saw: instances, their billed time, API calls, SSH bytes."""

    instances: int
    billed_instance_seconds: float
    dollars: float
    boot_seconds: float  # summed over instances: create to running
    nothing_left_running: bool
    api_calls: dict[str, int]
    ssh_bytes_up: int
    ssh_bytes_down: int
    ssh_round_trips: int = 0  # request/response turns over all relays (the fake counts them)
    # Calls the fake refused with 429 under its rate limits and under the daily search quota,
    # by endpoint (its ledger's counters; a fault rule's 429 is in neither). A run that paces
    # itself has none.
    rate_limited: dict[str, int] = field(default_factory=dict)
    quota_exceeded: dict[str, int] = field(default_factory=dict)
    last_ended_at: float | None = None  # epoch time of the last destroy; None if none ended

    @classmethod
    def from_ledger(cls, ledger: dict[str, Any], now: float) -> FakeBill:
        rows = ledger["instances"]
        lives = [(row["ended_at"] or now) - row["created_at"] for row in rows]
        boots = [row["running_at"] - row["created_at"] for row in rows if row["running_at"]]
        return cls(
            instances=len(rows),
            billed_instance_seconds=round(sum(lives), 3),
            dollars=round(
                sum(s * r["dph_total"] / 3600 for s, r in zip(lives, rows, strict=True)), 6
            ),
            boot_seconds=round(sum(boots), 3),
            nothing_left_running=all(row["ended_at"] is not None for row in rows),
            api_calls=dict(sorted(ledger["api_calls"].items())),
            ssh_bytes_up=int(ledger["ssh_bytes"]["up"]),
            ssh_bytes_down=int(ledger["ssh_bytes"]["down"]),
            ssh_round_trips=int(ledger.get("ssh_round_trips", 0)),
            rate_limited=dict(sorted(ledger.get("rate_limited", {}).items())),
            quota_exceeded=dict(sorted(ledger.get("quota_exceeded", {}).items())),
            last_ended_at=max((r["ended_at"] for r in rows if r["ended_at"]), default=None),
        )

    @property
    def api_calls_total(self) -> int:
        return sum(self.api_calls.values())

    def figures(self) -> dict[str, Any]:
        """The bill's figures a case's results show beside its own."""
        return {
            "instances": self.instances,
            "billed_instance_seconds": self.billed_instance_seconds,
            "boot_seconds": self.boot_seconds,
            "nothing_left_running": self.nothing_left_running,
            "api_calls_total": self.api_calls_total,
            "api_calls": self.api_calls,
            "refused_calls": self.refused_calls,
            "rate_limited": self.rate_limited,
            "quota_exceeded": self.quota_exceeded,
        }

    @property
    def refused_calls(self) -> int:
        """Calls refused by the limits or the quota: must be 0 for a plugin that paces."""
        return sum(self.rate_limited.values()) + sum(self.quota_exceeded.values())

    def teardown_seconds(self, last_output_at: float | None) -> float | None:
        """From the last job's output to the last instance's destroy in the fake: how long
        the instances outlived the work (the pool's teardown, paced destroys included)."""
        if last_output_at is None or self.last_ended_at is None:
            return None
        return round(self.last_ended_at - last_output_at, 3)


@dataclass(frozen=True)
class CaseResult:
    workflow: str
    mode: str  # a Case's label: local, ttl0, pool, pool-rtt50
    jobs: int
    parallel: int
    wall_seconds: float
    bill: FakeBill | None  # None for local runs
    plugin_summary: dict[str, Any] | None  # totals of .snakemake/vastai/summary-*.json
    phases: dict[str, Any] | None  # per-job breakdown from the probes (benchmarks.phases)
    # This machine's 1-minute load average before and after: other work on a small machine
    # slows the fake's instances, which share its CPUs.
    load_average_1min: tuple[float, float] | None = None
    rtt_ms: float = 0.0
    # Sequential workflows: the median gap between consecutive outputs' modification times,
    # i.e. one job's period as its outputs show it (local: the only per-job clock there is).
    output_period_seconds: float | None = None
    # Per warm job (medians; see benchmarks.phases): its period, run_job to the next run_job
    # (sequential workflows only); the SSH round trips between its run_job and its success
    # report (sequential only: parallel jobs' windows overlap); job + agent CPU on the instance.
    warm_period_seconds: float | None = None
    ssh_round_trips_per_warm_job: float | None = None
    remote_cpu_seconds_per_warm_job: float | None = None
    rate_limits: bool = RATE_LIMITS
    # Executor modes: the last output's mtime (the last job's result arriving here) to the
    # last destroy in the fake, and to Snakemake's exit (its teardown confirmed).
    teardown_seconds: float | None = None
    exit_after_last_output_seconds: float | None = None
    # The plugin's files as this case started: the header's digest is the run's start, and
    # a plugin edited while the benchmark runs shows here, case by case.
    plugin_tree_sha256: str | None = None

    @property
    def api_calls_per_job(self) -> float | None:
        return None if self.bill is None else round(self.bill.api_calls_total / self.jobs, 3)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "bill"}
        if self.bill is not None:
            data |= asdict(self.bill)
            data["boots"] = self.bill.instances
            data["api_calls_total"] = self.bill.api_calls_total
            data["api_calls_per_job"] = self.api_calls_per_job
            data["ssh_round_trips_per_job"] = round(self.bill.ssh_round_trips / self.jobs, 2)
            data["refused_calls"] = self.bill.refused_calls
        return data


def run_case(case: Case, scratch: Path) -> CaseResult:
    """Run one case in ``scratch`` (created here; must not exist) and measure it."""
    scratch.mkdir(parents=True)
    workdir = case.workflow.create(scratch / "workflow")
    load_before = os.getloadavg()[0]
    plugin_tree = plugin_tree_digest()
    bill = summary = phases = teardown = after_exit = None
    if case.mode == "local":
        command = snakemake_command("--cores", str(case.workflow.parallel))
        env = clean_env(case.rate_limits)
        wall = run_snakemake(command, workdir, env, case.timeout, scratch / "snakemake.log")
    else:
        wall, bill, round_trip_times, exited_at = run_on_fake(case, scratch, workdir)
        last_output = last_output_at(workdir, case.workflow.outputs)
        teardown = bill.teardown_seconds(last_output)
        after_exit = None if last_output is None else round(exited_at - last_output, 3)
        summary = plugin_summary(workdir)
        phases = job_phases(
            scratch / "trace.jsonl", workdir / LOGS, case.workflow.sequential, round_trip_times
        )
    warm = ((phases or {}).get("warm") or {}).get("median", {})
    result = CaseResult(
        workflow=case.workflow.name,
        mode=case.label,
        jobs=case.workflow.jobs,
        parallel=case.workflow.parallel,
        wall_seconds=wall,
        bill=bill,
        plugin_summary=summary,
        phases=phases,
        load_average_1min=(round(load_before, 2), round(os.getloadavg()[0], 2)),
        rtt_ms=case.rtt_ms,
        output_period_seconds=output_period(workdir, case.workflow),
        warm_period_seconds=warm.get("period"),
        ssh_round_trips_per_warm_job=warm.get("ssh_round_trips"),
        remote_cpu_seconds_per_warm_job=warm.get("remote_cpu_seconds"),
        rate_limits=case.rate_limits,
        teardown_seconds=teardown,
        exit_after_last_output_seconds=after_exit,
        plugin_tree_sha256=plugin_tree,
    )
    if bill is not None and bill.refused_calls:
        raise BenchmarkError(refused_calls_message(bill, scratch), result)
    return result


def refused_calls_message(bill: FakeBill, scratch: Path) -> str:
    return (
        f"the fake refused {bill.refused_calls} calls under its rate limits or quota "
        f"(rate_limited {bill.rate_limited}, quota_exceeded {bill.quota_exceeded}): the "
        f"plugin did not pace them; see {scratch / 'ledger.json'} and the Snakemake logs in "
        f"{scratch}"
    )


def last_output_at(workdir: Path, outputs: list[str]) -> float | None:
    """The newest output's modification time: the plugin writes each output here as it
    collects the job's results, so this is when the last job's work was done."""
    times = [(workdir / p).stat().st_mtime for p in outputs if (workdir / p).is_file()]
    return max(times, default=None)


def plugin_tree_digest() -> str:
    """SHA-256 over the plugin's Python files as they are on disk (paths and contents), so two
    results files tell whether they measured the same code, committed or not."""
    digest = hashlib.sha256()
    package = REPO_ROOT / "snakemake_executor_plugin_vastai"
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def output_period(workdir: Path, workflow: Workflow) -> float | None:
    """Median gap between consecutive outputs' modification times (sequential workflows)."""
    if not workflow.sequential or workflow.jobs < 2:
        return None
    times = [(workdir / path).stat().st_mtime for path in workflow.outputs]
    return round(statistics.median(b - a for a, b in itertools.pairwise(times)), 4)


def run_on_fake(
    case: Case, scratch: Path, workdir: Path
) -> tuple[float, FakeBill, list[float] | None, float]:
    """Wall seconds, the fake's bill, its SSH round trips' times and Snakemake's exit (epoch)
    of a run with the plugin, probes on; fails loudly if an instance outlives Snakemake."""
    with FakeVast(
        rate_limits=case.rate_limits,
        boot_seconds=case.boot_seconds,
        offers=uniform_offers(scratch / "offers.json"),
        rtt_ms=case.rtt_ms,
    ) as fake:
        command = executor_command(
            fake, case.workflow.parallel, "--vastai-pool-ttl", str(POOL_TTL[case.mode])
        )
        env = traced_env(fake, scratch / "trace.jsonl", case.rate_limits)
        wall = run_snakemake(command, workdir, env, case.timeout, scratch / "snakemake.log")
        exited_at = time.time()
        ledger = fake.ledger()
        bill = FakeBill.from_ledger(ledger, time.time())
        save_requests(fake, scratch / "requests.json")
    (scratch / "ledger.json").write_text(json.dumps(ledger))  # for analysis after the run
    if not bill.nothing_left_running:
        raise BenchmarkError("instances still running in the fake after Snakemake exited")
    times = ledger.get("ssh_round_trip_times")  # None from a fake that does not count them
    return wall, bill, None if times is None else [float(t) for t in times], exited_at


def uniform_offers(path: Path) -> Path:
    """The uniform catalogue (OFFER, OFFER_COUNT times) as an ``--offers`` file for the fake."""
    path.write_text(json.dumps([{"id": 9300001 + i, **OFFER} for i in range(OFFER_COUNT)]))
    return path


def executor_command(fake: FakeVast, jobs: int, *flags: str) -> list[str]:
    """Snakemake with the plugin against ``fake``, the probes on, with the plugin's defaults
    but for ``flags``."""
    return snakemake_command(
        "--executor", "vastai", "--jobs", str(jobs), "--vastai-api-url", fake.url, *flags,
        traced=True,
    )  # fmt: skip


def traced_env(fake: FakeVast, trace: Path, rate_limits: bool = RATE_LIMITS) -> dict[str, str]:
    """``clean_env`` with the fake's key and the file the probes write to."""
    return clean_env(rate_limits) | {"VAST_API_KEY": fake.api_key, TRACE_ENV: str(trace)}


def save_requests(fake: FakeVast, path: Path) -> list[dict[str, Any]] | None:
    """The fake's request log (every /api/ call: time, endpoint, status) into ``path``, for
    telling after the run which call a 429 answered and when; None from a fake without one."""
    try:
        requests = fake.requests()
    except Exception:  # an older fake: no such method or no such route
        return None
    path.write_text(json.dumps(requests))
    return requests


def snakemake_command(*args: str, traced: bool = False) -> list[str]:
    entry = "benchmarks.tracer" if traced else "snakemake"
    return [sys.executable, "-m", entry, *args]


def clean_env(rate_limits: bool = RATE_LIMITS) -> dict[str, str]:
    """This environment without Vast or Snakemake settings a developer may have exported;
    the repository on PYTHONPATH so that ``-m benchmarks.tracer`` works from the workdir.
    Without the fake's rate limits, the plugin need not pace either."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "SNAKEMAKE_"))}
    env |= {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    return env if rate_limits else env | {UNPACED_ENV: "1"}


def run_snakemake(
    command: list[str], workdir: Path, env: dict[str, str], timeout: float, log: Path
) -> float:
    """Wall seconds of a successful run. On timeout, Ctrl-C or SIGTERM, Snakemake gets SIGINT
    (its teardown destroys the instances), then SIGKILL if it lingers."""
    with open(log, "w") as out:
        start = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop Snakemake in order
        )
        code = wait_or_stop(process, timeout, log)
        wall = time.monotonic() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise BenchmarkError(f"Snakemake exited with {code}; see {log}:\n{tail}")
    return round(wall, 3)


def wait_or_stop(process: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    """Snakemake's exit status; on timeout, Ctrl-C or SIGTERM it is stopped in order first
    (a timeout is a BenchmarkError naming the log)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        raise BenchmarkError(f"Snakemake timed out after {timeout:.0f} s; see {log}") from None
    except BaseException:
        stop(process)
        raise


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT to Snakemake's process group, SIGKILL after the grace period."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def plugin_summary(workdir: Path) -> dict[str, Any] | None:
    """The totals of the plugin's cost summary of the newest run in ``workdir`` (a run's id,
    and so its file name, begins with its start time)."""
    found = sorted((workdir / ".snakemake" / "vastai").glob("summary-*.json"))
    if not found:
        return None
    return json.loads(found[-1].read_text())["totals"]
