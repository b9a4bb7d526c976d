"""Where a job's time goes, from the probes ``benchmarks.tracer`` wrote during a run.

Why per phase: a warm job's overhead is a fraction of a second spread over Snakemake (building
the job, scheduling the next one), the plugin (staging, starting the job agent, receiving the
results, noticing the end) and the instance (the agent, the job's start and exit). Only the
split says which one to make faster.

Phases of one job, in order and back to back (seconds; each ends where the next begins):

===================  ==========================================================================
``build``            Snakemake's ``run_job`` up to the submission report (job spec, command line)
``dispatch``         submission report to the job's worker thread starting
``acquire``          the pool handing out an instance: ~0 warm; rent, boot, SSH, bootstrap cold
``stage``            uploads the instance's store lacks (``Stager.prepare``) and the request
``start``            ``RemoteJob.start``: opening the agent's exec channel, sending the request
``remote``           end of ``start`` to the job's exit seen (end of ``JobRun._execute``), split
                     into ``remote_launch`` (to the agent's "started" frame seen: the agent's
                     start, unpacking, the fork or process start) and ``remote_run`` (the job
                     itself until its exit frame is seen); also, from the job's log, into
                     ``remote_snakemake`` (the remote Snakemake's own "Elapsed time": Snakefile,
                     DAG, the job's ``sleep``, bookkeeping) and ``remote_other`` (the rest)
``collect``          ``JobRun._collect``: receiving the result files after the exit
``release``          closing the job's stream and ``Pool.release`` (back to the pool; with
                     ``--vastai-pool-ttl 0`` the destroy), before the outcome is set
``notice``           outcome set to Snakemake's status loop reporting it
``schedule``         (sequential workflows only) success reported to the next job's
                     ``run_job``: Snakemake's bookkeeping and job selection
===================  ==========================================================================

So in a sequential workflow a job's ``period`` (its ``run_job`` to the next one's) is exactly the
sum of its phases. Per job, also: its remote CPU (``JobRun.usage`` from the ``collect`` probe:
the job's processes and the agent, as reported from the instance) and, in a sequential workflow,
the SSH round trips the fake's relays counted between its ``run_job`` and its success report.
"""

from __future__ import annotations

import bisect
import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

CRITICAL = (
    "build", "dispatch", "acquire", "stage", "start", "remote", "collect", "release", "notice"
)  # fmt: skip
COLD_PARTS = ("rent", "boot_wait", "connect", "bootstrap")
ELAPSED = re.compile(r"Elapsed time: (\d+):(\d+):(\d+(?:\.\d+)?)")


class Span(NamedTuple):
    start: float
    end: float
    detail: Any = None


@dataclass
class JobTrace:
    """The probed calls of one job, by span name (a span may repeat: ``frame``, ``api``)."""

    tag: str
    spans: dict[str, list[Span]] = field(default_factory=lambda: defaultdict(list))
    remote_elapsed: float | None = None  # the remote Snakemake's "Elapsed time"

    def first(self, span: str) -> Span | None:
        found = self.spans.get(span)
        return found[0] if found else None

    def duration(self, span: str) -> float | None:
        found = self.first(span)
        return None if found is None else found.end - found.start

    def frame(self, kind: str) -> Span | None:
        """The first agent frame of that kind seen (S started, X exit)."""
        return next((s for s in self.spans.get("frame", ()) if s.detail == kind), None)

    @property
    def cold(self) -> bool:
        return "rent" in self.spans

    @property
    def usage(self) -> dict[str, Any] | None:
        """``JobRun.usage`` as the collect probe recorded it."""
        found = self.first("collect")
        return found.detail if found is not None and isinstance(found.detail, dict) else None

    def remote_cpu(self) -> dict[str, float] | None:
        """The job's and the agent's CPU seconds on the instance, and their sum."""
        usage = self.usage or {}
        job, agent = usage.get("job_cpu_seconds"), usage.get("agent_cpu_seconds")
        if job is None or agent is None:
            return None
        return {"job": job, "agent": agent, "total": job + agent}

    def phases(self) -> dict[str, float] | None:
        """The job's critical-path phases; None if a probe is missing (a failed job)."""
        run_job, submitted = self.first("run_job"), self.first("submitted")
        job, execute = self.first("job"), self.first("execute")
        start, collect = self.first("start"), self.first("collect")
        success = self.first("reported_success")
        if None in (run_job, submitted, job, execute, start, collect, success):
            return None
        phases = {
            "build": submitted.start - run_job.start,
            "dispatch": job.start - submitted.start,
            "acquire": execute.start - job.start,
            "stage": start.start - execute.start,
            "start": start.end - start.start,
            "remote": execute.end - start.end,
            "collect": collect.end - execute.end,
            "release": job.end - collect.end,
            "notice": success.start - job.end,
        }
        started = self.frame("S")
        if started is not None:
            phases["remote_launch"] = started.end - start.end
            phases["remote_run"] = execute.end - started.end
        if self.remote_elapsed is not None:
            phases["remote_snakemake"] = self.remote_elapsed
            phases["remote_other"] = phases["remote"] - self.remote_elapsed
        if self.cold:
            phases |= {part: self.duration(part) or 0.0 for part in COLD_PARTS}
        return phases


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_traces(events: list[dict[str, Any]]) -> dict[str, JobTrace]:
    """The events that belong to a job, grouped by its tag."""
    jobs: dict[str, JobTrace] = {}
    for event in events:
        tag = event.get("tag")
        if tag is not None:
            span = Span(event["start"], event["end"], event.get("detail"))
            jobs.setdefault(tag, JobTrace(tag)).spans[event["span"]].append(span)
    return jobs


def remote_elapsed(log: Path) -> float | None:
    """The last "Elapsed time: H:MM:SS.ffffff" a remote Snakemake printed in its log."""
    if not log.exists():
        return None
    found = ELAPSED.findall(log.read_text(errors="replace"))
    if not found:
        return None
    hours, minutes, seconds = found[-1]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def count_between(times: list[float], start: float, end: float) -> int:
    """How many of the sorted ``times`` fall in [start, end)."""
    return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)


def job_phases(
    path: Path, logs: Path, sequential: bool, round_trip_times: list[float] | None = None
) -> dict[str, Any] | None:
    """Warm and cold jobs' phases (means) and per-job figures (medians), and the API calls the
    plugin made, by purpose. ``logs`` is the workdir's ``.snakemake/auxiliary/vastai-logs``
    (``<tag>.log`` per job). ``sequential``: one job at a time (a chain at ``--jobs 1``), so a
    job's period and its share of ``round_trip_times`` (the fake's ``ssh_round_trip_times``)
    are well defined: its window runs from its ``run_job`` to its success report."""
    events = read_events(path)
    jobs = job_traces(events)
    if not jobs:
        return None
    for job in jobs.values():
        job.remote_elapsed = remote_elapsed(logs / f"{job.tag}.log")
    ordered = sorted(jobs.values(), key=lambda j: (j.first("run_job") or Span(0.0, 0.0)).start)
    times = sorted(round_trip_times or [])
    rows: list[tuple[JobTrace, dict[str, float]]] = []
    in_jobs = 0
    for index, job in enumerate(ordered):
        phases = job.phases()
        if phases is None:
            continue
        run_job, success = job.first("run_job"), job.first("reported_success")
        following = ordered[index + 1].first("run_job") if index + 1 < len(ordered) else None
        if sequential and following is not None:
            phases["schedule"] = following.start - success.start
            phases["period"] = following.start - run_job.start
        if sequential and round_trip_times is not None:
            phases["ssh_round_trips"] = count_between(times, run_job.start, success.start)
            in_jobs += int(phases["ssh_round_trips"])
        cpu = job.remote_cpu()
        if cpu is not None:
            phases |= {f"remote_{k}_cpu_seconds": v for k, v in cpu.items() if k != "total"}
            phases["remote_cpu_seconds"] = cpu["total"]
        rows.append((job, phases))
    purposes = Counter(
        re.sub(r"\s*\d+", "", str(e.get("detail", ""))) for e in events if e["span"] == "api"
    )
    found = {
        "warm": _summarise([(j, p) for j, p in rows if not j.cold]),
        "cold": _summarise([(j, p) for j, p in rows if j.cold]),
        "api_calls_by_purpose": dict(sorted(purposes.items())),
        "api_calls_outside_jobs": sum(1 for e in events if e["span"] == "api" and not e["tag"]),
    }
    if sequential and round_trip_times is not None:
        found["ssh_round_trips_outside_jobs"] = len(times) - in_jobs
    return found


# Per-job figures summarised by their median (the headline numbers), not their mean.
MEDIAN_ONLY = (
    "period",
    "ssh_round_trips",
    "remote_cpu_seconds",
    "remote_job_cpu_seconds",
    "remote_agent_cpu_seconds",
)


def _summarise(rows: list[tuple[JobTrace, dict[str, float]]]) -> dict[str, Any] | None:
    """How many jobs, the mean of each phase and their sum along the critical path, medians
    of the per-job figures, and the API calls made on the jobs' own threads (rent, attach,
    destroy; the list calls that watch boots run on the status loop and count as outside
    jobs)."""
    if not rows:
        return None
    phases = [p for _, p in rows]
    names = list(dict.fromkeys(name for row in phases for name in row))

    def values(name: str) -> list[float]:
        return [row[name] for row in phases if name in row]

    mean = {n: round(statistics.fmean(values(n)), 3) for n in names if n not in MEDIAN_ONLY}
    median = {n: round(statistics.median(values(n)), 4) for n in MEDIAN_ONLY if values(n)}
    return {
        "jobs": len(rows),
        "mean": mean,
        "critical_path": round(sum(mean.get(n, 0.0) for n in (*CRITICAL, "schedule")), 3),
        "median": median,
        "api_calls_per_job": round(statistics.fmean(len(j.spans["api"]) for j, _ in rows), 3),
    }
