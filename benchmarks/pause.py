"""A long idle gap in the middle of the GPU work: stop the instance, keep it, or destroy it.

Why: a workflow's GPU jobs are often apart, with a local step, a download or a human review
between them. Destroyed (``--vastai-pool-ttl 0``), the next GPU job rents and boots again; kept
warm through the gap, the GPU bills all along; stopped (``--vastai-pool-stop-after``), Vast.ai
bills only the disk, and the next job starts the instance again (no rent, no image pull, but a
wait for the GPU and the container's start). What the second GPU job waits and what the run
costs, its GPU dollars and its disk dollars apart, are this case's figures.

Each mode runs once in its own fresh workdir against its own fresh fake (the rate limits on,
as on Vast.ai; a 30 s boot, as in the rerun case; the fake's restart time at its default:
the boot, at most 30 s): a GPU job, a local job that sleeps GAP_SECONDS, a GPU job of the same
kind. The run destroys everything at its end, so its dollars are all it cost.
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
    plugin_summary,
    plugin_tree_digest,
    refused_calls_message,
    save_requests,
    uniform_offers,
)
from benchmarks.report import ratio
from benchmarks.rerun import CREATES, Run, run
from benchmarks.workflows import PAUSE_WAITED, SLEEP_SECONDS, Workflow, pause_outputs
from tests.fakevast.faults import RESTART_CAP_SECONDS
from tests.fakevast.harness import FakeVast

BOOT_SECONDS = 30.0  # as the rerun case: the boot
QUICK_BOOT_SECONDS = 5.0  # --quick: the standard cases' boot
# The idle gap: a user's local step, a download or a human review between two GPU jobs.
GAP_SECONDS = 120.0
QUICK_GAP_SECONDS = 30.0
POOL_TTL_SECONDS = 600  # longer than the gap: only the destroy mode lets the instance go
STOP_AFTER_SECONDS = 10  # idle that long, the stopped mode's instance is stopped
STOP_AFTER = "--vastai-pool-stop-after"
# What the run is told to do with the idle instance in the gap; one entry per mode.
MODES: dict[str, tuple[str, ...]] = {
    "destroy": ("--vastai-pool-ttl", "0"),  # destroyed after the first job; rent, boot again
    "warm": ("--vastai-pool-ttl", str(POOL_TTL_SECONDS)),  # up through the gap, GPU billed
    "stopped": (  # stopped in the gap (disk billed), started again for the second job
        "--vastai-pool-ttl", str(POOL_TTL_SECONDS), STOP_AFTER, str(STOP_AFTER_SECONDS)
    ),
}  # fmt: skip
# What each mode must show for its figures to mean what they say: creates, stops, starts.
EXPECTED = {"destroy": (2, 0, 0), "warm": (1, 0, 0), "stopped": (1, 1, 1)}
STOPPED = re.compile(r"Stopped instance \d+ after")
STARTED = re.compile(r"Starting instance \d+ again for")
STATE_CHANGE = "PUT /api/v0/instances/{id}/"  # a stop, a start (or a label) in the request log
# How each figure is measured, for the results file (one entry per field of a mode).
_SUMMARY = "the plugin's own account: the totals of .snakemake/vastai/summary-<run>.json, "
_LOG_LINES = "lines in the Snakemake log"
HOW = {
    "wall_seconds": "the Snakemake subprocess, start to exit",
    "second_job_wait_seconds": "the local job's end (the epoch it wrote into its output after "
    f"its sleep, {PAUSE_WAITED}) to the second GPU job's agent 'started' frame seen by the "
    "plugin (the probes' trace.jsonl, span 'frame' with detail 'S': the job's process runs "
    "on the instance)",
    "first_job_seconds": "Snakemake's start (epoch, just before the subprocess starts) to the "
    "first GPU job's 'started' frame, as above",
    "restart_seconds": "stopped mode: the start call (the last PUT /api/v0/instances/{id}/ in "
    "the fake's request log before the restart) to the fake's restarted_at (running again)",
    "creates": "create requests (PUT /api/v0/asks/{id}/, POST /api/v0/asks/bulk/) in the "
    "fake's request log",
    "stops": f"'Stopped instance N after' {_LOG_LINES}",
    "starts": f"'Starting instance N again for' {_LOG_LINES}",
    "dollars": "the fake's bill: the sum of its ledger's 'cost' over every instance, from its "
    "create to its destroy (the run destroys every instance at its end): GPU, disk, bandwidth",
    "gpu_dollars": "of that, the ledger's 'gpu_cost': dph_base while the instance holds its "
    "GPU (from create, and from a start's getting it back, to its container's halt after a "
    "stop)",
    "disk_dollars": "of that, the ledger's 'disk_cost': storage_total_cost from create to "
    "destroy, stopped or not",
    "bandwidth_dollars": "of that, the ledger's 'bandwidth_cost'",
    "fake_gpu_free_seconds": "instance-seconds the fake billed no GPU for: the sum over "
    "instances of (ended_at - created_at) - gpu_cost / (dph_base / 3600)",
    "plugin_dollars": _SUMMARY + "'dollars'",
    "plugin_gpu_dollars": _SUMMARY + "'gpu_dollars'",
    "plugin_storage_dollars": _SUMMARY + "'storage_dollars'",
    "plugin_data_dollars": _SUMMARY + "'data_dollars'",
    "plugin_stopped_seconds": _SUMMARY + "'stopped_seconds'",
    "gpu_dollars_gap_seconds": "(gpu_dollars - plugin_gpu_dollars) / (dph_base / 3600): how "
    "many seconds of GPU the fake's bill and the plugin's account differ by",
    "disk_dollars_gap_seconds": "(disk_dollars - plugin_storage_dollars) / "
    "(storage_total_cost / 3600): the same in seconds of disk",
}


@dataclass(frozen=True)
class PauseResult:
    mode: str
    args: list[str]  # the run's flags (MODES)
    wall_seconds: float
    first_job_seconds: float | None
    second_job_wait_seconds: float | None
    restart_seconds: float | None  # stopped mode: the start call to running again
    creates: int
    stops: int
    starts: int
    dollars: float  # the fake's bill: GPU, disk and bandwidth
    gpu_dollars: float
    disk_dollars: float
    bandwidth_dollars: float
    fake_gpu_free_seconds: float
    plugin_dollars: float | None
    plugin_gpu_dollars: float | None
    plugin_storage_dollars: float | None
    plugin_data_dollars: float | None
    plugin_stopped_seconds: float | None
    gpu_dollars_gap_seconds: float | None
    disk_dollars_gap_seconds: float | None
    disk_gb: list[float]  # each instance's disk as created
    storage_dph: list[float]  # each instance's disk price, $/h (storage_total_cost)
    bill: FakeBill
    plugin_summary: dict[str, Any] | None  # totals of the run's summary-<run>.json
    load_average_1min: tuple[float, float]
    rate_limits: bool = RATE_LIMITS
    plugin_tree_sha256: str | None = None  # the plugin's files as this mode started

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "bill"} | self.bill.figures()


def default_boot_seconds(quick: bool) -> float:
    return QUICK_BOOT_SECONDS if quick else BOOT_SECONDS


def default_gap_seconds(quick: bool) -> float:
    return QUICK_GAP_SECONDS if quick else GAP_SECONDS


def restart_default(boot_seconds: float) -> float:
    """The fake's restart time as this case starts it (no ``restart_seconds``): the boot's,
    at most its cap (tests/fakevast/README.md, "Stop and start")."""
    return min(boot_seconds, RESTART_CAP_SECONDS)


def mode_flags(mode: str, stop_after: int = STOP_AFTER_SECONDS) -> tuple[str, ...]:
    """The mode's flags (MODES), with another stop-after for a test at tiny size."""
    flags = list(MODES[mode])
    if STOP_AFTER in flags:
        flags[flags.index(STOP_AFTER) + 1] = str(stop_after)
    return tuple(flags)


def timeout(boot_seconds: float, gap_seconds: float) -> float:
    """Generous: the gap, and both GPU jobs renting and booting an instance of their own."""
    return 300.0 + gap_seconds + 2 * (boot_seconds + 15.0)


def run_mode(
    workflow: Workflow,
    mode: str,
    scratch: Path,
    boot_seconds: float = BOOT_SECONDS,
    rate_limits: bool = RATE_LIMITS,
    gap_seconds: float = GAP_SECONDS,
    stop_after: int = STOP_AFTER_SECONDS,
) -> PauseResult:
    """The workflow in one mode in ``scratch`` (created here; must not exist), measured."""
    scratch.mkdir(parents=True)
    workdir = workflow.create(scratch / "workflow")
    load_before = os.getloadavg()[0]
    plugin_tree = plugin_tree_digest()
    flags = (*mode_flags(mode, stop_after), "--config", f"gap={gap_seconds:g}")
    with FakeVast(
        rate_limits=rate_limits,
        boot_seconds=boot_seconds,
        offers=uniform_offers(scratch / "offers.json"),
    ) as fake:
        limit = timeout(boot_seconds, gap_seconds)
        done = run(fake, workflow, workdir, scratch / "run", flags, rate_limits, limit)
        ledger = fake.ledger()
        requests = save_requests(fake, scratch / "requests.json") or []
    (scratch / "ledger.json").write_text(json.dumps(ledger))  # for analysis after the run
    rows = ledger["instances"]
    bill = FakeBill.from_ledger(ledger, time.time())
    summary = plugin_summary(workdir)
    log = (done.folder / "snakemake.log").read_text(errors="replace")
    gpu, disk = total(rows, "gpu_cost"), total(rows, "disk_cost")
    result = PauseResult(
        mode=mode,
        args=list(flags),
        wall_seconds=done.wall_seconds,
        first_job_seconds=done.first_job_seconds(),
        second_job_wait_seconds=second_job_wait(done, workdir),
        restart_seconds=restart_seconds(rows, requests),
        creates=sum(1 for r in requests if r["endpoint"] in CREATES),
        stops=len(STOPPED.findall(log)),
        starts=len(STARTED.findall(log)),
        dollars=total(rows, "cost"),
        gpu_dollars=gpu,
        disk_dollars=disk,
        bandwidth_dollars=total(rows, "bandwidth_cost"),
        fake_gpu_free_seconds=gpu_free_seconds(rows),
        plugin_dollars=None if summary is None else summary["dollars"],
        plugin_gpu_dollars=None if summary is None else summary["gpu_dollars"],
        plugin_storage_dollars=None if summary is None else summary["storage_dollars"],
        plugin_data_dollars=None if summary is None else summary["data_dollars"],
        plugin_stopped_seconds=None if summary is None else summary["stopped_seconds"],
        gpu_dollars_gap_seconds=gap_seconds_of(gpu, summary, "gpu_dollars", rows, "dph_base"),
        disk_dollars_gap_seconds=gap_seconds_of(
            disk, summary, "storage_dollars", rows, "storage_total_cost"
        ),
        disk_gb=[row["create_request"].get("disk") for row in rows],
        storage_dph=[row["storage_total_cost"] for row in rows],
        bill=bill,
        plugin_summary=summary,
        load_average_1min=(round(load_before, 2), round(os.getloadavg()[0], 2)),
        rate_limits=rate_limits,
        plugin_tree_sha256=plugin_tree,
    )
    check(result, workdir, scratch)
    return result


def total(rows: list[dict[str, Any]], key: str) -> float:
    return round(sum(row[key] for row in rows), 6)


def second_job_wait(done: Run, workdir: Path) -> float | None:
    """The local job's end (the epoch it wrote) to the second GPU job's 'started' frame."""
    waited = workdir / PAUSE_WAITED
    second = [job.frame("S") for job in done.jobs() if job.tag.startswith("second-")]
    if not waited.is_file() or not second or second[0] is None:
        return None
    return round(second[0].end - float(waited.read_text().strip()), 3)


def restart_seconds(rows: list[dict[str, Any]], requests: list[dict[str, Any]]) -> float | None:
    """The start call to running again, for the (first) instance that was started again: the
    start is the last state change the fake logged before its restarted_at."""
    restarted = [row["restarted_at"] for row in rows if row.get("restarted_at")]
    if not restarted:
        return None
    calls = [r["t"] for r in requests if r["endpoint"] == STATE_CHANGE and r["t"] < restarted[0]]
    return round(restarted[0] - max(calls), 3) if calls else None


def gpu_free_seconds(rows: list[dict[str, Any]]) -> float:
    """Instance-seconds the fake billed no GPU for (stopped: disk only)."""
    free = 0.0
    for row in rows:
        if row["ended_at"] is not None and row["dph_base"]:
            life = row["ended_at"] - row["created_at"]
            free += life - row["gpu_cost"] * 3600 / row["dph_base"]
    return round(free, 3)


def gap_seconds_of(
    fake_dollars: float,
    summary: dict[str, Any] | None,
    key: str,
    rows: list[dict[str, Any]],
    price: str,
) -> float | None:
    """(fake - plugin) dollars in seconds of that price ($/h, every instance at one price)."""
    prices = {row[price] for row in rows}
    if summary is None or len(prices) != 1 or not next(iter(prices)):
        return None
    return round((fake_dollars - summary[key]) * 3600 / prices.pop(), 2)


def check(result: PauseResult, workdir: Path, scratch: Path) -> None:
    """The run went as its mode must for its figures to mean what they say: nothing left
    billing, no call refused, both GPU outputs right, and the creates, stops and starts of
    its mode (EXPECTED). A BenchmarkError keeps the figures."""
    if not result.bill.nothing_left_running:
        raise BenchmarkError("instances still running in the fake after the run", result)
    if result.bill.refused_calls:
        raise BenchmarkError(refused_calls_message(result.bill, scratch), result)
    for name, text in pause_outputs().items():
        path = workdir / name
        if not path.is_file() or path.read_text() != text:
            raise BenchmarkError(f"{path} is not the GPU job's output", result)
    seen = (result.creates, result.stops, result.starts)
    if seen != EXPECTED[result.mode]:
        raise BenchmarkError(
            f"{result.mode}: {seen[0]} creates, {seen[1]} stops, {seen[2]} starts; expected "
            f"{EXPECTED[result.mode]} (see {scratch / 'run' / 'snakemake.log'})",
            result,
        )


def ratios(results: list[PauseResult]) -> list[dict[str, Any]]:
    """Stopped over each other mode: its dollars (all, GPU, disk), its second GPU job's wait
    and its wall time, as fractions of that mode's."""
    stopped = next((r for r in results if r.mode == "stopped"), None)
    if stopped is None:
        return []
    found = []
    for r in results:
        if r is stopped:
            continue
        waits = (stopped.second_job_wait_seconds, r.second_job_wait_seconds)
        found.append(
            {
                "mode": r.mode,
                "dollars": ratio(stopped.dollars, r.dollars),
                "gpu_dollars": ratio(stopped.gpu_dollars, r.gpu_dollars),
                "disk_dollars": ratio(stopped.disk_dollars, r.disk_dollars),
                "second_job_wait": None if None in waits else ratio(*waits),
                "wall": ratio(stopped.wall_seconds, r.wall_seconds),
            }
        )
    return found


def pause_document(
    head: dict[str, Any],
    workflow: Workflow,
    boot_seconds: float,
    results: list[PauseResult],
    rate_limits: bool = RATE_LIMITS,
    gap_seconds: float = GAP_SECONDS,
    stop_after: int = STOP_AFTER_SECONDS,
) -> dict[str, Any]:
    return {
        "header": head,
        "pause": {
            "rate_limits": rate_limits,
            "workflow": f"a GPU job, a local job that sleeps the gap, a GPU job of the same kind "
            f"(gpu=1, disk_mb=1000 each; each sleeps {SLEEP_SECONDS['pause']:g} s first)",
            "gpu_jobs": workflow.jobs,
            "parallel": workflow.parallel,
            "boot_seconds": boot_seconds,
            "restart_seconds": restart_default(boot_seconds),
            "gap_seconds": gap_seconds,
            "stop_after_seconds": stop_after,
            "modes": {mode: list(mode_flags(mode, stop_after)) for mode in MODES},
            "offers": {"count": OFFER_COUNT, **OFFER},
            "how": HOW,
        },
        "modes": [r.to_json() for r in results],
        "ratios_stopped_over_mode": ratios(results),
    }


def render_pause(doc: dict[str, Any]) -> str:
    case = doc["pause"]
    lines = [
        f"pause: gap {case['gap_seconds']:g} s, boot {case['boot_seconds']:g} s, restart "
        f"{case['restart_seconds']:g} s, stop after {case['stop_after_seconds']} s, rate limits "
        f"{'on' if case.get('rate_limits') else 'OFF'}",
        f"{'mode':<9}{'wall s':>8}{'wait s':>8}{'creates':>9}{'stops':>7}{'starts':>8}"
        f"{'$':>9}{'GPU $':>9}{'disk $':>9}{'plugin GPU $':>14}{'plugin disk $':>15}"
        f"{'stopped s':>11}{'refused':>9}{'clean':>7}",
    ]
    for m in doc["modes"]:
        wait, stopped = m["second_job_wait_seconds"], m["plugin_stopped_seconds"]
        lines.append(
            f"{m['mode']:<9}{m['wall_seconds']:>8.1f}"
            f"{'-' if wait is None else f'{wait:.1f}':>8}{m['creates']:>9}{m['stops']:>7}"
            f"{m['starts']:>8}{m['dollars']:>9.4f}{m['gpu_dollars']:>9.4f}"
            f"{m['disk_dollars']:>9.5f}{dollars(m['plugin_gpu_dollars'], 4):>14}"
            f"{dollars(m['plugin_storage_dollars'], 5):>15}"
            f"{'-' if stopped is None else f'{stopped:.1f}':>11}{m['refused_calls']:>9}"
            f"{'yes' if m['nothing_left_running'] else 'NO':>7}"
        )
    for r in doc["ratios_stopped_over_mode"]:
        wait = "-" if r["second_job_wait"] is None else f"{r['second_job_wait']:.2f}"
        lines.append(
            f"stopped/{r['mode']}: $ x{r['dollars']:.2f} (GPU x{r['gpu_dollars']:.2f}, disk "
            f"x{r['disk_dollars']:.2f}), second job's wait x{wait}, wall x{r['wall']:.2f}"
        )
    return "\n".join(lines)


def dollars(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
