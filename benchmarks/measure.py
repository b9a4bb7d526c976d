"""Running one case (a workflow in one mode) and reading what it cost.

Why a fresh fake and a fresh workdir per case: the fake's ledger then holds exactly this
case's instances, API calls and SSH bytes, and the plugin's state (ledger, keys, summary)
starts empty, so no number depends on the order the cases ran in.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.phases import job_phases
from benchmarks.tracer import TRACE_ENV
from benchmarks.workflows import Workflow
from snakemake_executor_plugin_vastai.marketplace import UNPACED_ENV
from tests.fakevast.harness import FakeVast

REPO_ROOT = Path(__file__).resolve().parents[1]
# The figures README quotes were measured on a fake without Vast.ai's rate limits (and so
# with the plugin unpaced); issue 17's measurement reruns every case with them on.
RATE_LIMITS = False
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
OFFER = {"gpu_name": "RTX 4090", "dph_base": 0.40, "hosting_type": 1}


class BenchmarkError(RuntimeError):
    """A case did not run as it must (Snakemake failed or timed out, an instance was left)."""


@dataclass(frozen=True)
class Case:
    workflow: Workflow
    mode: str  # one of MODES
    boot_seconds: float
    rtt_ms: float = 0.0  # the fake's SSH round-trip time; only the pool-rtt mode sets one

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
        )

    @property
    def api_calls_total(self) -> int:
        return sum(self.api_calls.values())


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
        return data


def run_case(case: Case, scratch: Path) -> CaseResult:
    """Run one case in ``scratch`` (created here; must not exist) and measure it."""
    scratch.mkdir(parents=True)
    workdir = case.workflow.create(scratch / "workflow")
    load_before = os.getloadavg()[0]
    bill = summary = phases = None
    if case.mode == "local":
        command = snakemake_command("--cores", str(case.workflow.parallel))
        wall = run_snakemake(command, workdir, clean_env(), case.timeout, scratch / "snakemake.log")
    else:
        wall, bill, round_trip_times = run_on_fake(case, scratch, workdir)
        summary = plugin_summary(workdir)
        phases = job_phases(
            scratch / "trace.jsonl", workdir / LOGS, case.workflow.sequential, round_trip_times
        )
    warm = ((phases or {}).get("warm") or {}).get("median", {})
    return CaseResult(
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
    )


def output_period(workdir: Path, workflow: Workflow) -> float | None:
    """Median gap between consecutive outputs' modification times (sequential workflows)."""
    if not workflow.sequential or workflow.jobs < 2:
        return None
    times = [(workdir / path).stat().st_mtime for path in workflow.outputs]
    return round(statistics.median(b - a for a, b in itertools.pairwise(times)), 4)


def run_on_fake(
    case: Case, scratch: Path, workdir: Path
) -> tuple[float, FakeBill, list[float] | None]:
    """Wall seconds, the fake's bill and its SSH round trips' times of a run with the plugin,
    probes on; fails loudly if an instance outlives Snakemake."""
    offers = scratch / "offers.json"
    offers.write_text(json.dumps([{"id": 9300001 + i, **OFFER} for i in range(OFFER_COUNT)]))
    with FakeVast(
        rate_limits=RATE_LIMITS, boot_seconds=case.boot_seconds, offers=offers, rtt_ms=case.rtt_ms
    ) as fake:
        command = snakemake_command(
            "--executor", "vastai",
            "--jobs", str(case.workflow.parallel),
            "--vastai-api-url", fake.url,
            "--vastai-pool-ttl", str(POOL_TTL[case.mode]),
            traced=True,
        )  # fmt: skip
        env = clean_env() | {"VAST_API_KEY": fake.api_key, TRACE_ENV: str(scratch / "trace.jsonl")}
        wall = run_snakemake(command, workdir, env, case.timeout, scratch / "snakemake.log")
        ledger = fake.ledger()
        bill = FakeBill.from_ledger(ledger, time.time())
    (scratch / "ledger.json").write_text(json.dumps(ledger))  # for analysis after the run
    if not bill.nothing_left_running:
        raise BenchmarkError("instances still running in the fake after Snakemake exited")
    times = ledger.get("ssh_round_trip_times")  # None from a fake that does not count them
    return wall, bill, None if times is None else [float(t) for t in times]


def snakemake_command(*args: str, traced: bool = False) -> list[str]:
    entry = "benchmarks.tracer" if traced else "snakemake"
    return [sys.executable, "-m", entry, *args]


def clean_env() -> dict[str, str]:
    """This environment without Vast or Snakemake settings a developer may have exported;
    the repository on PYTHONPATH so that ``-m benchmarks.tracer`` works from the workdir.
    Without the fake's rate limits, the plugin need not pace either."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "SNAKEMAKE_"))}
    env |= {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    return env if RATE_LIMITS else env | {UNPACED_ENV: "1"}


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
    """The totals of the plugin's cost summary (one run per workdir, so one file)."""
    found = sorted((workdir / ".snakemake" / "vastai").glob("summary-*.json"))
    if not found:
        return None
    return json.loads(found[-1].read_text())["totals"]
